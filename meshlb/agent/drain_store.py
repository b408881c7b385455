"""The cluster's drain map, saved in this node's state directory.

The map lives in every member's memory and rides with gossip; a copy on disk is what
keeps it when every agent restarts at once (an upgrade of the whole cluster, a power
cut), since then no member is left to hand it on. The file is rewritten whole, through
a temporary file and a rename, on every change; it is small (one line per backend ever
drained). A file that cannot be read is reported and ignored: the peers' copies win at
the join anyway.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from meshlb.cluster.messages import DrainEntry

log = logging.getLogger(__name__)

FILE_NAME = "drains.json"
VERSION = 1


class DrainStore:
    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.path = Path(state_dir) / FILE_NAME

    def load(self) -> list[DrainEntry]:
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            log.error("drain state %s unreadable, starting without it: %s", self.path, exc)
            return []
        try:
            if doc.get("version") != VERSION:
                raise ValueError(f"version {doc.get('version')!r}")
            entries = [DrainEntry(str(e["key"]), bool(e["drained"]), int(e["stamp"]), str(e["origin"]))
                       for e in doc["drains"]]
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            log.error("drain state %s malformed, starting without it: %s", self.path, exc)
            return []
        return entries

    def save(self, entries: Iterable[DrainEntry]) -> None:
        doc = {"version": VERSION, "drains": [
            {"key": e.key, "drained": e.drained, "stamp": e.stamp, "origin": e.origin} for e in entries]}
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.path)
