"""layouts.py must match bpf/meshlb.h exactly: every structure's size and every
field's name, offset and size against the BTF of the compiled objects, and every
constant against the value the C compiler computes from the header."""
from __future__ import annotations

import ctypes
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from meshlb.dataplane import layouts as L

ROOT = Path(__file__).resolve().parents[2]
OBJ_DIR = ROOT / "meshlb" / "dataplane" / "bpf"
HEADER = ROOT / "bpf" / "meshlb.h"


def _btf(obj: Path) -> dict[int, dict]:
    out = subprocess.run(["bpftool", "btf", "dump", "file", str(obj), "format", "raw", "-j"],
                         check=True, capture_output=True, text=True).stdout
    return {t["id"]: t for t in json.loads(out)["types"]}


@pytest.fixture(scope="module")
def btfs() -> list[dict[int, dict]]:
    if shutil.which("bpftool") is None:
        pytest.fail("bpftool is needed to read BTF")
    objs = sorted(OBJ_DIR.glob("*.bpf.o"))
    assert objs, "no compiled objects: run make"
    return [_btf(o) for o in objs]


def _size(types: dict[int, dict], tid: int) -> int:
    t = types[tid]
    k = t["kind"]
    if k in ("TYPEDEF", "CONST", "VOLATILE", "RESTRICT", "TYPE_TAG"):
        return _size(types, t["type_id"])
    if k == "ARRAY":
        return _size(types, t["type_id"]) * t["nr_elems"]
    if k == "PTR":
        return 8
    return t["size"]


def _find(btfs, name):
    for types in btfs:
        for t in types.values():
            if t["kind"] == "STRUCT" and t["name"] == name:
                return types, t
    return None, None


@pytest.mark.parametrize("cls", list(L.C_NAMES), ids=lambda c: c.__name__)
def test_struct_matches_btf(btfs, cls):
    cname = L.C_NAMES[cls]
    types, t = _find(btfs, cname)
    assert t is not None, f"struct {cname} is in no object's BTF"
    assert ctypes.sizeof(cls) == t["size"], f"sizeof(struct {cname})"
    fields = [(f[0], getattr(cls, f[0])) for f in cls._fields_]
    members = t["members"]
    assert [n for n, _ in fields] == [m["name"] for m in members]
    for (name, desc), m in zip(fields, members):
        assert m["bits_offset"] % 8 == 0
        assert desc.offset == m["bits_offset"] // 8, f"{cname}.{name} offset"
        assert desc.size == _size(types, m["type_id"]), f"{cname}.{name} size"


def test_every_header_struct_is_mirrored():
    declared = set(re.findall(r"^struct (\w+) \{", HEADER.read_text(), re.M))
    assert declared <= set(L.C_NAMES.values()), declared - set(L.C_NAMES.values())


def _c_values(names: list[str]) -> dict[str, int]:
    """Evaluate each name with the host compiler against the real header."""
    src = "#include <linux/types.h>\n#include <stdio.h>\n#include \"meshlb.h\"\nint main(void){\n"
    src += "".join(f'printf("{n} %llu\\n", (unsigned long long)({n}));\n' for n in names)
    src += "return 0;}\n"
    cc = shutil.which("clang") or shutil.which("cc")
    assert cc, "no C compiler"
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "c.c").write_text(src)
        subprocess.run([cc, "-I", str(HEADER.parent), "-o", f"{d}/c", f"{d}/c.c"],
                       check=True, capture_output=True)
        out = subprocess.run([f"{d}/c"], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (ln.split() for ln in out.splitlines())}


def test_constants_match_header():
    text = HEADER.read_text()
    defines = re.findall(r"^#define (MLB_\w+)\s", text, re.M)
    enums = dict(re.findall(r"^enum (\w+) \{(.*?)\};", text, re.S | re.M))
    assert set(enums) == set(L.C_ENUMS), "every enum of the header has a mirror"
    members = {name: re.findall(r"^\s*(MLB_\w+)", body, re.M) for name, body in enums.items()}
    c = _c_values(defines + [m for ms in members.values() for m in ms])
    for name in defines:
        if name == "MLB_H":
            continue
        assert getattr(L, name) == c[name], name
    for cname, names in members.items():
        py_enum, prefix = L.C_ENUMS[cname]
        for name in names:
            short = name[len(prefix):]
            py = getattr(L, name) if short == "MAX" else py_enum[short]
            assert int(py) == c[name], name
        assert {prefix + m.name for m in py_enum} | {prefix + "MAX"} == set(names), cname


def test_drop_reasons_are_one_range():
    """verdict() in the balancer drops for the reasons in [DROP_FIRST, DROP_LAST] and
    passes for every other: the DROP_* counters must be exactly those."""
    drops = {c for c in L.Counter if c.name.startswith("DROP_")}
    assert drops == {c for c in L.Counter if L.MLB_CNT_DROP_FIRST <= c <= L.MLB_CNT_DROP_LAST}


def _resolve(types: dict[int, dict], tid: int) -> dict:
    t = types[tid]
    while t["kind"] in ("TYPEDEF", "CONST", "VOLATILE", "RESTRICT", "TYPE_TAG"):
        t = types[t["type_id"]]
    return t


def _maps(types: dict[int, dict]) -> dict[str, dict[str, dict]]:
    """name -> {member ("type", "key", ...): the type its pointer points to} of every
    map the object defines (libbpf's BTF-defined maps: a struct of pointers)."""
    sec = next(t for t in types.values() if t["kind"] == "DATASEC" and t["name"] == ".maps")
    out = {}
    for v in sec["vars"]:
        var = types[v["type_id"]]
        desc = _resolve(types, var["type_id"])
        out[var["name"]] = {m["name"]: types[types[m["type_id"]]["type_id"]]
                            for m in desc["members"]}
    return out


def _same_layout(types: dict[int, dict], t: dict, cls: type) -> bool:
    t = _resolve(types, t["id"])
    if t["kind"] == "STRUCT":
        return L.C_NAMES.get(cls) == t["name"]
    return (t["kind"] == "INT" and not issubclass(cls, ctypes.Structure)
            and ctypes.sizeof(cls) == t["size"])


def test_maps_match_btf():
    """Every map of each object is in layouts' table, with the key and value types
    Python reads it with; the arrays indexed by an enum are as long as the enum."""
    for obj in sorted(OBJ_DIR.glob("*.bpf.o")):
        types = _btf(obj)
        maps = _maps(types)
        want = L.MAPS[obj.name.split(".")[0]]
        assert set(maps) == set(want), obj.name
        for name, layout in want.items():
            if layout is L.OPAQUE:
                continue
            key, value = layout
            assert _same_layout(types, maps[name]["key"], key), f"{obj.name}: {name} key"
            assert _same_layout(types, maps[name]["value"], value), f"{obj.name}: {name} value"
        for name, n in (("counters", L.MLB_CNT_MAX), ("tracer_stats", L.MLB_TRACER_STAT_MAX)):
            if name in maps:
                assert maps[name]["max_entries"]["nr_elems"] == n, f"{obj.name}: {name}"
