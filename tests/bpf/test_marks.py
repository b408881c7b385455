"""The pinned eviction-mark store: survives its process, saves only changes."""
from __future__ import annotations

import os
import uuid

import pytest

from meshlb.dataplane.libbpf import BpfError, Map
from meshlb.dataplane.marks import MarkStore

pytestmark = pytest.mark.privileged


@pytest.fixture
def pin_path():
    path = f"/sys/fs/bpf/mlbmarks-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    yield path
    if os.path.exists(path):
        os.unlink(path)


def test_marks_outlive_the_store_and_only_changes_are_written(pin_path):
    first = MarkStore.open(pin_path, 128)
    assert first.load() == {}
    assert first.save([("mix1", 1700, 5), ("mix3", 1800, 0)]) == 2
    assert first.save([("mix1", 1700, 5), ("mix3", 1800, 2)]) == 1  # mix1 unchanged
    first.close()  # the agent dies; the pin keeps the map
    second = MarkStore.open(pin_path, 128)
    assert second.load() == {"mix1": (1700, 5), "mix3": (1800, 2)}
    assert second.save([("mix1", 1700, 5)]) == 0  # known from the adopted map
    assert second.save([("mix1", 1901, 1)]) == 1  # the origin restarted: a new epoch
    assert second.load()["mix1"] == (1901, 1)
    second.unpin()
    second.close()
    assert not os.path.exists(pin_path)


def test_a_pin_of_another_shape_is_refused(pin_path):
    from meshlb.dataplane.libbpf import BPF_MAP_TYPE_HASH

    other = Map.create(BPF_MAP_TYPE_HASH, 8, 8, 4)
    other.pin(pin_path)
    other.close()
    with pytest.raises(BpfError, match="not a mark store"):
        MarkStore.open(pin_path, 128)


def test_overlong_names_are_refused(pin_path):
    store = MarkStore.open(pin_path, 4)
    try:
        with pytest.raises(ValueError, match="longer than"):
            store.save([("x" * 65, 1, 1)])
    finally:
        store.unpin()
        store.close()
