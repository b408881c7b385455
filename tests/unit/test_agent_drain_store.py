"""The drain map saved in the state directory (meshlb/agent/drain_store.py)."""
from __future__ import annotations

import json
import logging

from meshlb.agent.drain_store import DrainStore
from meshlb.cluster.node import DrainEntry


def test_saved_map_comes_back_whole(tmp_path):
    store = DrainStore(tmp_path / "state")  # made on the first save
    assert store.load() == []
    entries = [DrainEntry("member:mix2", True, 1795533400123, "mix1"), DrainEntry("server:2001:db8::5", False, 7, "mix3")]
    store.save(entries)
    assert store.load() == entries
    assert (tmp_path / "state").stat().st_mode & 0o077 == 0
    store.save(entries[1:])  # rewritten whole
    assert store.load() == entries[1:]
    assert not list((tmp_path / "state").glob("*.tmp"))


def test_an_unreadable_file_is_reported_and_ignored(tmp_path, caplog):
    store = DrainStore(tmp_path)
    for text in ("{not json", json.dumps({"version": 9, "drains": []}),
                 json.dumps({"version": 1, "drains": [{"key": "member:a"}]}), json.dumps([1])):
        store.path.write_text(text)
        with caplog.at_level(logging.ERROR):
            assert store.load() == []
        assert str(store.path) in caplog.text
        caplog.clear()
