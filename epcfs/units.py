"""Size arguments on the command line: bytes with an optional K/M/G/T suffix (powers of 1024)."""

import argparse
import math

_SHIFTS = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}

PAGE_SIZE = 4096
"""EPC is handed out in 4 KiB pages: capacities and section sizes are whole pages."""


def parse_size(text: str) -> int:
    """`128M` -> 134217728; for argparse `type=`, so errors are argparse errors."""
    s = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = s[-1:] if s[-1:] in _SHIFTS else ""
    number = s[: len(s) - len(unit)]
    if not (number.isascii() and number.isdigit()):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 4096, 64K, 128M, 4G)")
    return int(number) << _SHIFTS[unit]


def parse_pages(text: str) -> int:
    """A size that must be a positive whole number of 4 KiB pages (an EPC size)."""
    nbytes = parse_size(text)
    if nbytes <= 0 or nbytes % PAGE_SIZE:
        raise argparse.ArgumentTypeError(
            f"not a positive multiple of 4K: {text!r} (use e.g. 64M, 4096K)")
    return nbytes


def parse_nonnegative(text: str) -> float:
    """A finite number >= 0 (seconds, a time scale): nan, inf and negatives are refused."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"not a finite number >= 0: {text!r}")
    return value
