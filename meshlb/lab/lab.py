"""The netns lab: a meshlb cluster on one Linux host.

Shape: a bridge in a namespace of its own (nothing of the lab touches the host's
interfaces or routes, and there is no route out), ``router`` and ``mix1``..``mixN`` each
joined to it by a veth, and ``client`` behind ``router`` on a link of its own. Every mix
runs the agent and the demo application (with ``serve = "none"`` the agent alone: a
balancer only). ``servers`` adds ``srv1``..``srvM`` on the same bridge: real servers that
run the demo application and no meshlb, listed as servers of every VIP of their family;
each holds the dr VIPs on its loopback with ARP for them suppressed, as an LVS-DR real
server does. The router's route to each VIP is an ECMP
multipath over all mixes hashed on the 5-tuple of every packet, as a data-centre router
spreads flows; mixes answer the client through the router. (ECMP in the client itself
would not do: Linux hashes a local TCP flow by its socket's random txhash, re-drawn
after a retransmission timeout, so one connection could change mix mid-flow.)

How client packets reach the mixes is the lab's ``routing``:

* ``static`` (the default): the router's route to each VIP is a static ECMP route over
  every mix, as above; tests that play the router change it (``route_vips_through``).
* ``bgp``: the router runs BIRD (``bgp_router.py``), peering with every mix (one
  session per mix and address family, BFD on each) and merging the mixes' routes into
  one ECMP route; there is no static route, so a VIP is routed to the mixes that
  announce it, and to none while none does.
* ``l2``: no router: the client sits on the mixes' bridge and reaches the VIPs on-link,
  by ARP / neighbour discovery; whichever mix owns a VIP answers for it.

Each mix's processes run in a cgroup v2 directory of their own under the hierarchy's
root (``meshlb-lab-<prefix>/mixN``), to which its agent attaches the tracer's sock_ops
hook: as on a host of its own, only that mix's sockets run that mix's hook.

The lab outlives the command that built it: its state (namespaces, PIDs, sockets) is
kept in ``/run/meshlb/lab/<prefix>/state.json`` for ``status``, ``exec`` and ``down``.
Addresses come from 198.18.0.0/15, the range set aside for benchmarking (RFC 2544), and
fd00:6d6c:62::/48, so they cannot be confused with a real network.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyroute2 import netns as pr_netns

from meshlb import control
from meshlb.dataplane.mounts import cgroup2_root
from meshlb.lab import bgp_router
from meshlb.lab.netns import Namespace, Topology, enter_netns, netns_path

LAB_ROOT = Path("/run/meshlb/lab")
PIN_ROOT = Path("/sys/fs/bpf/meshlb")
NET4 = "198.18.0"
NET6 = "fd00:6d6c:62::"
VIP_DR = "198.19.0.1"
VIP_NAT = "198.19.0.2"
VIP_DR6 = "fd00:6d6c:63::1"
APP_PORT = 80
GOSSIP_PORT = 7946


class LabError(Exception):
    pass


def mix_addr4(i: int) -> str:
    return f"{NET4}.{10 + i}"


def mix_addr6(i: int) -> str:
    return f"{NET6}{10 + i:x}"


# the client's own link to the router: 198.18.1.0/24, fd00:6d6c:62:1::/64
CLIENT_NET4 = "198.18.1.0/24"
CLIENT_NET6 = "fd00:6d6c:62:1::/64"
CLIENT4 = "198.18.1.2"
CLIENT6 = "fd00:6d6c:62:1::2"
ROUTER_CLIENT4 = "198.18.1.1"
ROUTER_CLIENT6 = "fd00:6d6c:62:1::1"
ROUTER4 = f"{NET4}.1"  # the router on the mixes' LAN
ROUTER6 = f"{NET6}1"
# routing "l2": the client on the mixes' LAN, the VIP ranges on-link
CLIENT_L2_4 = f"{NET4}.2"
CLIENT_L2_6 = f"{NET6}2"
VIP_NET4 = "198.19.0.0/24"
VIP_NET6 = "fd00:6d6c:63::/64"
ROUTINGS = ("static", "bgp", "l2")
SERVES = ("all", "none")
# srvN: 198.18.0.(230+N), fd00:6d6c:62::(230+N); the mixes end at .210 (200 mixes)
SERVER_BASE = 230
MAX_SERVERS = 20


def server_addr4(i: int) -> str:
    return f"{NET4}.{SERVER_BASE + i}"


def server_addr6(i: int) -> str:
    return f"{NET6}{SERVER_BASE + i:x}"


def is_mix(node: str) -> bool:
    """Lab node names: ``client``, ``router``, ``mix1``..``mixN``, ``srv1``..``srvM``."""
    return node.startswith("mix") and node[3:].isdigit()


def is_server(node: str) -> bool:
    return node.startswith("srv") and node[3:].isdigit()


@dataclass
class LabOptions:
    nodes: int = 3
    prefix: str = "mlb"
    xdp_mode: str = "native"
    discovery: str = "unicast"
    preset: str = "lan"
    idle_timeout_s: float = 300.0
    handshake_timeout_s: float = 10.0
    closing_timeout_s: float = 10.0
    health_interval_s: float = 1.0
    # "auto": a cgroup per mix (module docstring), where cgroup v2 is mounted; else the
    # agents' conntrack.sockops_cgroup as given ("off", a path)
    sockops_cgroup: str = "auto"
    extra_toml: str = ""  # appended to every mix's cluster file (tests tune timings with it)
    routing: str = "static"  # "static", "bgp" or "l2" (module docstring)
    servers: int = 0  # real servers srv1..srvM (module docstring)
    serve: str = "all"  # "none": the mixes balance only (node.serve = false)
    vips: list[dict[str, Any]] = field(
        default_factory=lambda: [
            {"address": VIP_DR, "port": APP_PORT, "protocol": "tcp", "mode": "dr"},
            {"address": VIP_NAT, "port": APP_PORT, "protocol": "tcp", "mode": "nat"},
            {"address": VIP_DR6, "port": APP_PORT, "protocol": "tcp", "mode": "dr"},
        ]
    )


def state_dir(prefix: str) -> Path:
    return LAB_ROOT / prefix


def load_state(prefix: str) -> dict[str, Any]:
    path = state_dir(prefix) / "state.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise LabError(f"no lab {prefix!r} is up (no {path})") from None


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _toml_str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_str(str(k))} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return str(value)


def vip_servers(servers: int, vip: dict[str, Any]) -> list[str]:
    """The lab's ``servers`` of the VIP's family (unless the VIP names its own)."""
    if "servers" in vip:
        return list(vip["servers"])
    v6 = ":" in vip["address"]
    return [server_addr6(i) if v6 else server_addr4(i) for i in range(1, servers + 1)]


def server_names(servers: int, vip: dict[str, Any]) -> set[str]:
    """The backend names the VIP's servers have in the agents' tables."""
    port = vip.get("backend_port", vip["port"]) if vip.get("mode") == "nat" else vip["port"]
    out = set()
    for s in vip_servers(servers, vip):
        if s.startswith("["):
            host, _, rest = s[1:].partition("]")
            given = rest[1:]
        elif s.count(":") == 1:
            host, given = s.split(":")
        else:
            host, given = s, ""
        out.add(f"[{host}]:{given or port}" if ":" in host else f"{host}:{given or port}")
    return out


def mix_config(opts: LabOptions, i: int, sdir: Path, cgroup: str | None = None) -> str:
    name = f"mix{i}"
    peers = [f"{mix_addr4(j)}:{GOSSIP_PORT}" for j in range(1, opts.nodes + 1) if j != i]
    lines = [
        "# generated by `meshlb lab up`",
        "[node]",
        f"name = {_toml_str(name)}",
        'iface = "eth0"',
        f'bind = "{mix_addr4(i)}:{GOSSIP_PORT}"',
        f"xdp_mode = {_toml_str(opts.xdp_mode)}",
        f"pin_dir = {_toml_str(str(PIN_ROOT / f'{opts.prefix}-{name}'))}",
        f"control = {_toml_str(str(sdir / f'{name}.sock'))}",
        f"state_dir = {_toml_str(str(sdir / 'state' / name))}",
        'metrics = "127.0.0.1:9477"',
        f"serve = {_toml_value(opts.serve == 'all')}",
        "",
        "[cluster]",
        f"label = {_toml_str('lab-' + opts.prefix)}",
        f"key_file = {_toml_str(str(sdir / 'cluster.key'))}",
        f"peers = [{', '.join(_toml_str(p) for p in peers)}]",
        f"discovery = {_toml_str(opts.discovery)}",
        f"preset = {_toml_str(opts.preset)}",
        "",
        "[health]",
        f"interval = {opts.health_interval_s}",
        f"timeout = {min(1.0, opts.health_interval_s)}",
        f"app_port = {APP_PORT}",
        "",
        "[conntrack]",
        f"idle_timeout_s = {opts.idle_timeout_s}",
        f"handshake_timeout_s = {opts.handshake_timeout_s}",
        f"closing_timeout_s = {opts.closing_timeout_s}",
        f"sockops_cgroup = {_toml_str(cgroup or opts.sockops_cgroup)}",
        "",
    ]
    for vip in opts.vips:
        lines.append("[[vips]]")
        for key, value in vip.items():
            if key != "servers":
                lines.append(f"{key} = {_toml_value(value)}")
        servers = vip_servers(opts.servers, vip)
        if servers:
            lines.append(f"servers = {_toml_value(servers)}")
        lines.append("")
    return "\n".join(lines) + opts.extra_toml + "\n"


class Lab:
    """Build (`up`), inspect and remove (`down`) a lab. Python API used by the CLI and tests."""

    def __init__(self, opts: LabOptions) -> None:
        self.opts = opts
        self.sdir = state_dir(opts.prefix)
        self.topology: Topology | None = None
        self.state: dict[str, Any] = {}
        self._cgroup: Path | None = None

    # --- up ---------------------------------------------------------------------------

    def up(self, wait_s: float = 60.0) -> dict[str, Any]:
        opts = self.opts
        if (self.sdir / "state.json").exists():
            raise LabError(f"lab {opts.prefix!r} is already up (meshlb lab down --prefix {opts.prefix})")
        if not 1 <= opts.nodes <= 200:
            raise LabError("--nodes must be between 1 and 200")
        if opts.routing not in ROUTINGS:
            raise LabError(f"--routing must be one of {', '.join(ROUTINGS)}, not {opts.routing!r}")
        if not 0 <= opts.servers <= MAX_SERVERS:
            raise LabError(f"--servers must be between 0 and {MAX_SERVERS}")
        if opts.serve not in SERVES:
            raise LabError(f"--serve must be one of {', '.join(SERVES)}, not {opts.serve!r}")
        if opts.serve == "none" and not opts.servers:
            raise LabError("--serve none leaves the VIPs no backend: add real servers (--servers M)")
        self.sdir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.sdir, 0o700)
        topo = self.topology = Topology(prefix=opts.prefix)
        procs: list[subprocess.Popen] = []
        try:
            key_path = self.sdir / "cluster.key"
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(os.urandom(32).hex() + "\n")
            topo.add_bridge("br")
            client = topo.add_namespace("client")
            routed = opts.routing != "l2"
            # veth quirks of native XDP (see Topology.connect): full transmit checksums
            # everywhere, and an XDP program on the bridge side of every balancer port
            if routed:
                router = topo.add_namespace("router")
                topo.connect(router, "br", addresses=[f"{ROUTER4}/24", f"{ROUTER6}/64"], tx_checksum=False)
                topo.link_pair(client, router, a_ifname="eth0", b_ifname="eth1",
                               a_addresses=[f"{CLIENT4}/24", f"{CLIENT6}/64"],
                               b_addresses=[f"{ROUTER_CLIENT4}/24", f"{ROUTER_CLIENT6}/64"], tx_checksum=False)
                client.add_route("0.0.0.0/0", gateway=ROUTER_CLIENT4)
                client.add_route("::/0", gateway=ROUTER_CLIENT6)
                topo.enable_forwarding(router)
                topo.enable_l4_multipath_hash(router)
                nodes: dict[str, Any] = {
                    "client": {"netns": client.name, "addresses": [CLIENT4, CLIENT6], "role": "client"},
                    "router": {"netns": router.name, "role": "router",
                               "addresses": [ROUTER4, ROUTER6, ROUTER_CLIENT4, ROUTER_CLIENT6]},
                }
            else:
                topo.connect(client, "br", addresses=[f"{CLIENT_L2_4}/24", f"{CLIENT_L2_6}/64"], tx_checksum=False)
                client.add_route(VIP_NET4, ifname="eth0")  # on-link: the client asks ARP / NDP for each VIP
                client.add_route(VIP_NET6, ifname="eth0")
                nodes = {"client": {"netns": client.name, "addresses": [CLIENT_L2_4, CLIENT_L2_6], "role": "client"}}
            mixes: list[Namespace] = []
            for i in range(1, opts.nodes + 1):
                ns = topo.add_namespace(f"mix{i}")
                # an application host, not a router: the agent must turn on what it needs
                ns.sysctl("net.ipv4.conf.all.forwarding", 0)
                ns.sysctl("net.ipv6.conf.all.forwarding", 0)
                topo.connect(ns, "br", addresses=[f"{mix_addr4(i)}/24", f"{mix_addr6(i)}/64"],
                             peer_xdp_pass=True, tx_checksum=False)
                if routed:
                    ns.add_route(CLIENT_NET4, gateway=ROUTER4)
                    ns.add_route(CLIENT_NET6, gateway=ROUTER6)
                mixes.append(ns)
            for i in range(1, opts.servers + 1):
                name = f"srv{i}"
                ns = topo.add_namespace(name)
                topo.connect(ns, "br", addresses=[f"{server_addr4(i)}/24", f"{server_addr6(i)}/64"],
                             tx_checksum=False)
                if routed:  # dr answers go straight to the client, through the router
                    ns.add_route(CLIENT_NET4, gateway=ROUTER4)
                    ns.add_route(CLIENT_NET6, gateway=ROUTER6)
                for vip in opts.vips:
                    if vip.get("mode", "dr") == "dr":
                        topo.add_loopback_vip(ns, vip["address"])
                app_log = open(self.sdir / f"{name}.app.log", "ab")
                app = ns.popen([sys.executable, "-m", "meshlb.lab.app", name, str(APP_PORT)], stdout=app_log,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
                procs.append(app)
                nodes[name] = {"netns": ns.name, "addresses": [server_addr4(i), server_addr6(i)], "role": "server",
                               "app_pid": app.pid, "log": str(self.sdir / f"{name}.app.log")}
            daemons: list[dict[str, Any]] = []
            if opts.routing == "static":
                set_next_hops(router, opts.vips, [f"mix{i}" for i in range(1, opts.nodes + 1)])
            elif opts.routing == "bgp":
                peers = [(f"mix{i}", [mix_addr4(i), mix_addr6(i)]) for i in range(1, opts.nodes + 1)]
                bird = bgp_router.RouterBird(self.sdir)
                pid = bird.start(router, bgp_router.router_config(ROUTER4, peers))
                daemons.append({"what": "router BIRD", "node": "router", "pid": pid, "marker": str(bird.ctl)})
                self.state["daemons"] = daemons  # for the clean-up below, if the rest fails
            cg_root = cgroup2_root() if opts.sockops_cgroup == "auto" else None
            if cg_root is not None:
                self._cgroup = Path(cg_root) / f"meshlb-lab-{opts.prefix}"
                self._cgroup.mkdir(exist_ok=True)  # left empty by a lab that crashed
            for i, ns in enumerate(mixes, start=1):
                name = f"mix{i}"
                cg = None
                if self._cgroup is not None:
                    cg = self._cgroup / name
                    cg.mkdir(exist_ok=True)
                nodes[name] = {"cgroup": str(cg) if cg else None}
                cfg_path = self.sdir / f"{name}.toml"
                cfg_path.write_text(mix_config(opts, i, self.sdir, str(cg) if cg else None))
                if opts.serve == "all":  # a balancer only runs no application
                    app_log = open(self.sdir / f"{name}.app.log", "ab")
                    app = ns.popen(
                        [sys.executable, "-m", "meshlb.lab.app", name, str(APP_PORT)], cgroup=cg,
                        stdout=app_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                    )
                    procs.append(app)
                    nodes[name]["app_pid"] = app.pid
                agent = self._start_agent(ns, name, cg)
                procs.append(agent)
                nodes[name] |= {
                    "netns": ns.name,
                    "role": "mix",
                    "addresses": [mix_addr4(i), mix_addr6(i)],
                    "control": str(self.sdir / f"{name}.sock"),
                    "config": str(cfg_path),
                    "agent_pid": agent.pid,
                    "log": str(self.sdir / f"{name}.log"),
                    "pin_dir": str(PIN_ROOT / f"{opts.prefix}-{name}"),
                }
            self.state = {
                "prefix": opts.prefix,
                "routing": opts.routing,
                "serve": opts.serve,
                "servers": opts.servers,
                "cgroup": str(self._cgroup) if self._cgroup else None,
                "bridge_netns": topo["br"].name,
                "nodes": nodes,
                "vips": opts.vips,
                "daemons": daemons,
                "created": time.time(),
            }
            if opts.routing == "bgp":
                self.state["bgp"] = {
                    "router_asn": bgp_router.ROUTER_ASN,
                    "mix_asn": bgp_router.MIX_ASN,
                    "router_addresses": [ROUTER4, ROUTER6],
                    "router_control": str(bgp_router.RouterBird(self.sdir).ctl),
                    "bfd_interval_ms": bgp_router.BFD_INTERVAL_MS,
                    "bfd_multiplier": bgp_router.BFD_MULTIPLIER,
                    "hold_time": bgp_router.HOLD_TIME,
                }
            self._save()
            self.wait_converged(wait_s)
            return self.state
        except BaseException:
            for p in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
            for p in procs:
                _wait_pid_gone(p.pid, 3)
            _stop_daemons(self.state, self.sdir, [])
            topo.teardown()
            self._remove_pins()
            if self._cgroup is not None:
                _remove_cgroup(self._cgroup, [])
            shutil.rmtree(self.sdir, ignore_errors=True)
            raise

    def _start_agent(self, ns: Namespace, name: str, cgroup: str | os.PathLike | None) -> subprocess.Popen:
        log = open(self.sdir / f"{name}.log", "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        return ns.popen(
            [sys.executable, "-m", "meshlb", "join", "--config", str(self.sdir / f"{name}.toml")], cgroup=cgroup,
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, env=env,
        )

    def popen(self, node: str, argv: list[str], **kw: Any) -> subprocess.Popen:
        """Start ``argv`` on ``node`` as its own processes run: in its namespace and, for
        a mix, its cgroup (its applications' sockets are the ones its hook sees)."""
        return self.namespace(node).popen(argv, cgroup=self.state["nodes"][node].get("cgroup"), **kw)

    def _save(self) -> None:
        tmp = self.sdir / "state.json.tmp"
        tmp.write_text(json.dumps(self.state, indent=2))
        tmp.replace(self.sdir / "state.json")

    def wait_converged(self, timeout: float) -> None:
        """Until every mix's agent answers and sees every mix alive with one table
        digest, and every VIP has every backend it should (health checks passed)."""
        deadline = time.monotonic() + timeout
        want = set(self.mixes())
        last = "no answer yet"
        while time.monotonic() < deadline:
            try:
                digests: set[str] = set()
                ok = True
                for name in sorted(want):
                    node = self.state["nodes"][name]
                    if not _pid_alive(node["agent_pid"]):
                        raise LabError(f"agent of {name} exited: {_tail(node['log'])}")
                    result = control.call(node["control"], "members", timeout=2)
                    alive = {m["name"] for m in result["members"] if m["status"] == "alive"}
                    digests.update(m["table_digest"] for m in result["members"] if m["status"] == "alive")
                    if not want <= alive:
                        ok = False
                        last = f"{name} sees alive: {sorted(alive)}"
                if ok and len(digests) == 1 and "" not in digests:
                    vips = control.call(self.state["nodes"][sorted(want)[0]]["control"], "vips", timeout=2)
                    expected = {v["address"]: self.expected_backends(v) for v in self.state["vips"]}
                    short = [v["vip"] for v in vips["vips"]
                             if set(v["backends"]) != expected[_vip_address(v["vip"])]]
                    if not short:
                        return
                    last = f"VIPs without all their backends yet: {short}"
                    ok = False
                elif ok:
                    last = f"table digests differ: {sorted(digests)}"
            except control.ControlError as exc:
                last = str(exc)
            time.sleep(0.2)
        raise LabError(f"lab did not converge within {timeout:g} s: {last}")

    def expected_backends(self, vip: dict[str, Any]) -> set[str]:
        """The backends the VIP has once every check passed: the mixes its members
        admit (unless the mixes balance only) and its servers."""
        mixes = set(self.mixes()) if self.state.get("serve", "all") == "all" else set()
        admitted = vip.get("members", "all")
        if admitted == "none":
            mixes = set()
        elif admitted != "all":
            mixes &= set(admitted)
        return mixes | server_names(self.state.get("servers", 0), vip)

    def servers(self) -> list[str]:
        return sorted((n for n in self.state["nodes"] if is_server(n)), key=lambda n: int(n[3:]))

    # --- operations used by tests ----------------------------------------------------

    def namespace(self, node: str) -> Namespace:
        return Namespace(None, self.state["nodes"][node]["netns"], node)

    def mixes(self) -> list[str]:
        return sorted((n for n in self.state["nodes"] if is_mix(n)), key=lambda n: int(n[3:]))

    def route_vips_through(self, mixes: list[str]) -> None:
        """Point the router's ECMP route for every VIP at ``mixes`` only: what a real
        router does when its own check (BFD, a BGP hold timer) withdraws a dead next
        hop, and when the node comes back. Static routing only: elsewhere the router
        (or the segment) does this itself."""
        routing = self.state.get("routing", "static")
        if routing != "static":
            raise LabError(f"the lab's routing is {routing}: the router's routes are not the test's to set")
        set_next_hops(self.namespace("router"), self.state["vips"], mixes)

    def next_hops(self) -> dict[str, list[str]]:
        """The router's next hops for each VIP, as its kernel has them."""
        if "router" not in self.state["nodes"]:
            return {}
        return bgp_router.next_hops(self.namespace("router"), [v["address"] for v in self.state["vips"]])

    def restart_agent(self, node: str, kill_signal: int = signal.SIGKILL) -> int:
        info = self.state["nodes"][node]
        with contextlib.suppress(ProcessLookupError):
            os.kill(info["agent_pid"], kill_signal)
        _wait_pid_gone(info["agent_pid"], 10)
        agent = self._start_agent(self.namespace(node), node, info.get("cgroup"))
        info["agent_pid"] = agent.pid
        self._save()
        return agent.pid

    # --- down -------------------------------------------------------------------------

    @staticmethod
    def down(prefix: str, grace_s: float = 10.0) -> list[str]:
        """Remove everything the lab made; returns problems (empty when all went)."""
        problems: list[str] = []
        sdir = state_dir(prefix)
        try:
            state = json.loads((sdir / "state.json").read_text())
        except (FileNotFoundError, ValueError):
            state = {"nodes": {}}
        pids = []
        for node in state.get("nodes", {}).values():
            for key in ("agent_pid", "app_pid"):
                if key in node:
                    pids.append(node[key])
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for pid in pids:
            _wait_pid_gone(pid, max(0.1, deadline - time.monotonic()))
        for pid in pids:
            if _pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                _wait_pid_gone(pid, 3)
        # daemons detach from whoever started them: the router's BIRD and any speaker
        # a mix's agent left running (by their PID files under the lab's directory)
        _stop_daemons(state, sdir, problems)
        names = {n["netns"] for n in state.get("nodes", {}).values() if "netns" in n}
        if state.get("bridge_netns"):
            names.add(state["bridge_netns"])
        # a lab half-built by a crashed `up` has no state file: fall back to the prefix
        with contextlib.suppress(FileNotFoundError):
            names.update(n for n in os.listdir("/run/netns") if _is_lab_netns(n, prefix))
        for name in sorted(names):
            if os.path.exists(netns_path(name)):
                try:
                    pr_netns.remove(name)
                except Exception as exc:  # keep removing the rest
                    problems.append(f"netns {name}: {exc}")
        Lab._remove_pins_for(prefix, problems)
        cgroup = state.get("cgroup")
        if cgroup is None:  # no state (a crashed `up`): where it would be
            root = cgroup2_root()
            cgroup = os.path.join(root, f"meshlb-lab-{prefix}") if root else None
        if cgroup is not None and os.path.isdir(cgroup):
            _remove_cgroup(Path(cgroup), problems)
        shutil.rmtree(sdir, ignore_errors=True)
        return problems

    def _remove_pins(self) -> None:
        Lab._remove_pins_for(self.opts.prefix, [])

    @staticmethod
    def _remove_pins_for(prefix: str, problems: list[str]) -> None:
        if not PIN_ROOT.exists():
            return
        for entry in PIN_ROOT.iterdir():
            if entry.name.startswith(f"{prefix}-mix"):
                try:
                    shutil.rmtree(entry)
                except OSError as exc:
                    problems.append(f"pins {entry}: {exc}")
        with contextlib.suppress(OSError):
            PIN_ROOT.rmdir()  # only if empty: other agents may pin there


def _stop_daemons(state: dict[str, Any], sdir: Path, problems: list[str]) -> None:
    known = [(d["pid"], d["marker"]) for d in state.get("daemons", ())]
    for pid, marker in known + bgp_router.daemon_pids_under(sdir):
        if not bgp_router.stop_daemon(pid, marker):
            problems.append(f"daemon {pid} ({marker}) would not stop")


def set_next_hops(router: Namespace, vips: list[dict[str, Any]], mixes: list[str]) -> None:
    for vip in vips:
        v6 = ":" in vip["address"]
        gws = [mix_addr6(int(m[3:])) if v6 else mix_addr4(int(m[3:])) for m in mixes]
        router.set_next_hops(vip["address"] + ("/128" if v6 else "/32"), gws)


def _remove_cgroup(path: Path, problems: list[str], wait_s: float = 3.0) -> None:
    """rmdir the lab's cgroup and its mixes' (a cgroup goes once its last process has
    exited and been reaped, which can lag a killed process's exit briefly)."""
    if not path.is_dir():
        return
    for d in [*sorted(p for p in path.iterdir() if p.is_dir()), path]:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                d.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                if time.monotonic() > deadline:
                    problems.append(f"cgroup {d}: {exc}")
                    break
                time.sleep(0.05)


def _tail(path: str, lines: int = 12) -> str:
    try:
        text = Path(path).read_text(errors="replace").strip().splitlines()
    except FileNotFoundError:
        return "(no log)"
    return " | ".join(text[-lines:]) or "(empty log)"


def _is_lab_netns(name: str, prefix: str) -> bool:
    rest = name[len(prefix) + 1 :] if name.startswith(prefix + "-") else None
    return rest is not None and (rest in ("br", "client", "router") or is_mix(rest) or is_server(rest))


def _vip_address(key: str) -> str:
    """The address of a VIP key ("addr:port/proto", IPv6 in brackets)."""
    host = key.rsplit(":", 1)[0]
    return host[1:-1] if host.startswith("[") else host


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours counts as gone
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _wait_pid_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            return True
        time.sleep(0.05)
    return not _pid_alive(pid)


def status(prefix: str) -> dict[str, Any]:
    state = load_state(prefix)
    state.setdefault("routing", "static")  # a lab from before routing was a choice
    for node in state["nodes"].values():
        if "agent_pid" in node:
            node["agent_running"] = _pid_alive(node["agent_pid"])
        if "app_pid" in node:
            node["app_running"] = _pid_alive(node["app_pid"])
    for d in state.get("daemons", ()):
        d["running"] = bgp_router.daemon_running(d["pid"], d["marker"])
    if state["routing"] == "bgp" and "router" in state["nodes"]:
        router = Namespace(None, state["nodes"]["router"]["netns"], "router")
        state["next_hops"] = bgp_router.next_hops(router, [v["address"] for v in state["vips"]])
    return state


def exec_in(prefix: str, node: str, argv: list[str]) -> None:
    """Replace this process with ``argv`` running inside ``node``'s namespace."""
    state = load_state(prefix)
    if node not in state["nodes"]:
        raise LabError(f"no node {node!r} in lab {prefix!r} (nodes: {', '.join(state['nodes'])})")
    info = state["nodes"][node]
    enter_netns(info["netns"])  # single-threaded here, so the whole process moves
    if info.get("cgroup"):
        # a server started here is the mix's application: its hook must see its sockets
        with open(os.path.join(info["cgroup"], "cgroup.procs"), "w") as f:
            f.write("0")
    if "control" in info:
        os.environ["MESHLB_CONTROL"] = info["control"]
    if not argv:
        raise LabError("nothing to run: meshlb lab exec NODE -- CMD ...")
    if argv[0] == "meshlb":
        argv = [sys.executable, "-m", "meshlb", *argv[1:]]
    try:
        os.execvp(argv[0], argv)
    except FileNotFoundError:
        raise LabError(f"{argv[0]}: command not found") from None
