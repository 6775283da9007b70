"""Damaged archives for tests, made the way real ones break: a flipped byte inside one zip member
(bad CRC), a member whose recorded size runs past the end of the file, a file cut short.

    flip_member_byte(zip_path, "Flicker8k_Dataset/1_ab.jpg")   # that member fails its CRC check
    cut_short(path, 0.5)                                       # keep the first half of the bytes
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

_CENTRAL_HEADER = b"PK\x01\x02"


def _data_start(raw: bytes | bytearray, info: zipfile.ZipInfo) -> int:
    """Where a member's (compressed) bytes begin: after its local header, name and extra field."""
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len


def flip_member_byte(zip_path: Path, member: str) -> Path:
    """Invert one byte in the middle of member's data: the zip still opens, that member fails."""
    with zipfile.ZipFile(zip_path) as zf:
        info = zf.getinfo(member)
    raw = bytearray(zip_path.read_bytes())
    raw[_data_start(raw, info) + info.compress_size // 2] ^= 0xFF
    zip_path.write_bytes(bytes(raw))
    return zip_path


def overstate_last_member(zip_path: Path) -> str:
    """Record the last member's compressed size as larger than the file holds (a member cut short
    by the end of the file); returns its name."""
    with zipfile.ZipFile(zip_path) as zf:
        info = zf.infolist()[-1]
    raw = bytearray(zip_path.read_bytes())
    entry = raw.rfind(_CENTRAL_HEADER)  # the last central directory entry is the last member's
    raw[entry + 20 : entry + 28] = struct.pack("<II", len(raw), len(raw))  # compressed, uncompressed
    zip_path.write_bytes(bytes(raw))
    return info.filename


def cut_short(path: Path, fraction: float) -> bytes:
    """The first `fraction` of path's bytes (what a cut connection or a bad mirror leaves)."""
    data = path.read_bytes()
    return data[: int(len(data) * fraction)]


def zip_folder(folder: Path, dest: Path, *, junk: bool = True) -> Path:
    """A .zip holding folder/ (deflated), with macOS '__MACOSX' junk as real zips often have."""
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, f"{folder.name}/{path.relative_to(folder).as_posix()}")
        if junk:
            zf.writestr(f"__MACOSX/{folder.name}/._x.jpg", b"\x00\x05\x16\x07")
    return dest
