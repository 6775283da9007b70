"""A mirror's own checksums, by file name, and what to tell a user whose download does not match.

    sums = user_checksums(["val2014.zip=md5:a3d79f5ed8d289b7a7554ce06a5782b3"], "mirror/SHA256SUMS")
    sums["val2014.zip"]      # Checksum(md5="a3d7...", sha256=None, source="data.download.checksums")

Entries (``data.download.checksums``) are ``NAME=md5:HEX``, ``NAME=sha256:HEX`` or ``NAME=HEX`` (32 hex
digits: MD5, 64: SHA-256). A sums file (``data.download.checksums_file``) holds ``md5sum`` /
``sha256sum`` output (``HEX  NAME`` or ``HEX *NAME`` per line; blank lines and ``#`` comments
ignored) or BSD tags (``MD5 (NAME) = HEX``, ``SHA256 (NAME) = HEX``); only a name's last path
component counts, and lines of other algorithms (SHA-1, SHA-512, ...: ``SHA512 (NAME) = HEX`` or 40,
56, 96 or 128 hex digits) are skipped. Entries win over the file. A malformed entry or a line that
does not parse raises ConfigError naming it.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from captioning.config import ConfigError

log = logging.getLogger(__name__)

_HEX_LENGTHS = {32: "md5", 64: "sha256"}
# Digests of algorithms not used here (SHA-1, SHA-224, SHA-384, SHA-512 / BLAKE2b): lines skipped.
_OTHER_HEX_LENGTHS = frozenset({40, 56, 96, 128})
_BSD_TAGS = {"MD5": "md5", "SHA256": "sha256", "SHA2-256": "sha256"}
_GNU_LINE = re.compile(r"([0-9a-fA-F]+) [ *](.+)")
_BSD_LINE = re.compile(r"([A-Za-z][A-Za-z0-9-]*) ?\((.+)\) ?= ?([0-9a-fA-F]+)")


@dataclass(frozen=True)
class Checksum:
    """A file's checksums as the user gave them, and where they were given (for messages)."""

    md5: str | None
    sha256: str | None
    source: str


def user_checksums(entries: Sequence[str], sums_file: str | os.PathLike[str] | None) -> dict[str, Checksum]:
    """The user's checksums by file name: the sums file's, then the entries' on top (per algorithm)."""
    found: dict[str, dict[str, str]] = {}
    sources: dict[str, str] = {}
    if sums_file is not None:
        path = Path(sums_file).expanduser()
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"data.download.checksums_file: cannot read {path} ({e})") from None
        for number, line in enumerate(lines, 1):
            parsed = _parse_sums_line(line.strip(), f"data.download.checksums_file {path}, line {number}")
            if parsed is not None:
                name, algo, value = parsed
                found.setdefault(name, {})[algo] = value
                sources[name] = f"data.download.checksums_file {path}"
        if not sources and any(line.strip() and not line.lstrip().startswith("#") for line in lines):
            log.warning(
                "data.download.checksums_file %s: no MD5 or SHA-256 line (other algorithms' lines are "
                "skipped): it checks nothing",
                path,
            )
    for entry in entries:
        name, algo, value = _parse_entry(entry)
        found.setdefault(name, {})[algo] = value
        sources[name] = "data.download.checksums"
    return {
        name: Checksum(md5=sums.get("md5"), sha256=sums.get("sha256"), source=sources[name])
        for name, sums in found.items()
    }


def how_to_proceed(name: str, md5: str | None, kept: Path | None) -> str:
    """The options a user has after a size or checksum mismatch of the file called name (one line).

    With a kept download (``kept``, its ``md5``): accept exactly those bytes. Without one (the
    server announced another size, nothing was kept): the mirror's own checksum, or checks off."""
    off = "--data.download.verify_checksums=false (completeness and the archive's index are still checked)"
    if kept is None or md5 is None:
        return (
            f"To proceed if the server's copy of {name} is the one you want (a mirror's): run again "
            f"with --data.download.checksums={name}=md5:HEX, HEX being the MD5 the mirror publishes "
            f"for it (or add the line 'HEX  {name}' to the file that data.download.checksums_file "
            f"names), or with {off}; later runs need neither option. Otherwise run again once the "
            "server has the expected file."
        )
    return (
        f"To proceed if this copy of {name} is the one you want (a mirror's): run again with "
        f"--data.download.checksums={name}=md5:{md5} (or add the line '{md5}  {name}' to the file "
        f"that data.download.checksums_file names), or with {off}; the kept download is then used "
        "without fetching it again, and later runs need neither option. Otherwise run again once "
        "the server has the expected file."
    )


def _parse_entry(entry: str) -> tuple[str, str, str]:
    name, sep, spec = entry.partition("=")
    algo, colon, value = spec.strip().rpartition(":")
    value = value.strip().lower()
    algo = algo.strip().lower().replace("-", "") if colon else _HEX_LENGTHS.get(len(value), "")
    name = PurePosixPath(name.strip()).name
    if not sep or not name or algo not in ("md5", "sha256") or not _is_hex(value, algo):
        raise ConfigError(
            f"data.download.checksums: cannot read {entry!r}; expected NAME=md5:HEX (32 hex digits) "
            "or NAME=sha256:HEX (64), e.g. val2014.zip=md5:a3d79f5ed8d289b7a7554ce06a5782b3"
        )
    return name, algo, value


def _parse_sums_line(line: str, where: str) -> tuple[str, str, str] | None:
    if not line or line.startswith("#"):
        return None
    gnu = _GNU_LINE.fullmatch(line)
    bsd = _BSD_LINE.fullmatch(line)
    if gnu is not None:
        value, name = gnu.group(1).lower(), gnu.group(2)
        if len(value) in _OTHER_HEX_LENGTHS:
            return None  # another algorithm's digest (sha1sum, sha512sum, b2sum output)
        algo = _HEX_LENGTHS.get(len(value), "")
    elif bsd is not None:
        tag, name, value = bsd.group(1).upper(), bsd.group(2), bsd.group(3).lower()
        if tag not in _BSD_TAGS:
            return None  # another algorithm's tag (SHA1, SHA512, BLAKE2b, ...)
        algo = _BSD_TAGS[tag]
    else:
        algo = name = value = ""
    name = PurePosixPath(name.strip().replace("\\", "/")).name
    if not name or not _is_hex(value, algo):
        raise ConfigError(
            f"{where}: cannot read {line!r}; expected 'HEX  NAME' (md5sum/sha256sum output) "
            "or 'MD5 (NAME) = HEX' / 'SHA256 (NAME) = HEX'"
        )
    return name, algo, value


def _is_hex(value: str, algo: str) -> bool:
    return _HEX_LENGTHS.get(len(value)) == algo and re.fullmatch(r"[0-9a-f]+", value) is not None
