"""The mount table parser that finds where the sock_ops hook can attach."""
from meshlb.dataplane.mounts import cgroup2_root


def test_cgroup2_root_is_the_first_cgroup2_mounted_whole(tmp_path):
    info = tmp_path / "mountinfo"
    info.write_text(
        "25 30 0:23 / /sys rw,nosuid shared:7 - sysfs sysfs rw\n"
        "33 25 0:28 / /sys/fs/cgroup/cpu rw shared:11 - cgroup cgroup rw,cpu\n"
        # a subtree of the hierarchy bind-mounted: attaching there misses the rest
        "40 25 0:31 /kubepods /mnt/pods rw shared:20 - cgroup2 cgroup2 rw\n"
        "41 25 0:31 / /sys/fs/cgroup/uni\\040fied rw shared:21 - cgroup2 cgroup2 rw,nsdelegate\n"
        "42 25 0:31 / /other rw shared:22 - cgroup2 cgroup2 rw\n")
    assert cgroup2_root(str(info)) == "/sys/fs/cgroup/uni fied"
    info.write_text("33 25 0:28 / /sys/fs/cgroup/cpu rw shared:11 - cgroup cgroup rw,cpu\n")
    assert cgroup2_root(str(info)) is None
    assert cgroup2_root(str(tmp_path / "missing")) is None
