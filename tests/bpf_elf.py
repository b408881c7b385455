"""Editing a compiled BPF object in place, for tests that need an object the kernel
refuses: the ELF64 little-endian section table is all that has to be read."""
from __future__ import annotations

import struct
from pathlib import Path


def sections(data: bytes) -> dict[str, tuple[int, int]]:
    """Section name -> (file offset, size)."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not an ELF64 little-endian object")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strtab = headers[shstrndx][4]
    out = {}
    for name, _type, _flags, _addr, offset, size in headers:
        end = data.index(b"\0", strtab + name)
        out[data[strtab + name:end].decode()] = (offset, size)
    return out


def patch_first_insn(path: Path, section: str, insn: bytes) -> None:
    """Replace the first instruction (8 bytes) of the program in ``section``."""
    assert len(insn) == 8
    data = bytearray(path.read_bytes())
    offset, size = sections(data)[section]
    assert size >= 8
    data[offset:offset + 8] = insn
    path.write_bytes(bytes(data))
