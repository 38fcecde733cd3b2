"""Byte sizes as users write them in configs and on the command line: 4096, "4KiB", "1.5GiB", "512MB"."""

from __future__ import annotations

import re

from deepspeed_fuyou.errors import FuyouConfigError

_UNITS = {
    "b": 1,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | str, field: str) -> int:
    """Bytes in `value`; raises FuyouConfigError naming `field` (e.g. "fuyou.io.block_size") when malformed."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise FuyouConfigError(field, value, "a size must be an integer or a string", 'write e.g. 1048576 or "1MiB"')
    if isinstance(value, int):
        if value < 0:
            raise FuyouConfigError(field, value, "a size cannot be negative", "use a positive number of bytes")
        return value
    match = _SIZE.match(value)
    unit = match.group(2).lower() if match else ""
    if not match or (unit and unit not in _UNITS):
        raise FuyouConfigError(
            field,
            value,
            "not a size",
            'use bytes or a number with a unit B, KiB, MiB, GiB, TiB, KB, MB, GB, e.g. "8GiB"',
        )
    return int(float(match.group(1)) * _UNITS[unit or "b"])


def format_size(nbytes: float) -> str:
    """Human-readable binary size, e.g. 1.50 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(nbytes) < 1024:
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.2f} TiB"
