"""Byte counts from ints or strings such as "2GiB", "512MiB", "64k"."""
import re

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
          "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}


_LIMIT = 1 << 63  # what the core's size_t arguments take without surprise


def parse_bytes(value, name="size"):
    """An int >= 0 from an int or a size string; ValueError naming `name` otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a byte count, got {value!r}")
    n = None
    if isinstance(value, int):
        n = value
    elif isinstance(value, float) and value.is_integer():
        n = int(value)
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", value)
        if m and m.group(2).lower() in _UNITS:
            n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n is None:
        raise ValueError(f"{name} must be a byte count such as 1073741824 or '1GiB', got {value!r}")
    if not 0 <= n < _LIMIT:
        raise ValueError(f"{name} must be between 0 and 2**63 - 1 bytes, got {value!r}")
    return n


def format_bytes(n):
    """'1.50 GiB' style, for tables."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
