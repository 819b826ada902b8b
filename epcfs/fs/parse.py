"""The kernel's string parsers, bit for bit: what interface-file writes go through.

Every function raises KernelError with the errno the kernel's helper returns, so a
write handler is `value = parser(text)` and nothing else. Text is the write buffer
decoded as latin-1 (one char per byte, never fails), as the kernel sees bytes.
"""

from __future__ import annotations

import errno

from ..model.constants import PAGE_COUNTER_MAX, PAGE_SIZE
from ..model.errors import KernelError

KERNEL_SPACE = " \t\n\v\f\r\xa0"
"""isspace() in lib/ctype.c: the C locale's six, plus 0xA0 (latin-1 NBSP is _S|_SP)."""

U64_MASK = (1 << 64) - 1
S64_MAX = (1 << 63) - 1
INT_MIN, INT_MAX = -(1 << 31), (1 << 31) - 1


def strstrip(text: str) -> str:
    """strstrip(): leading and trailing isspace() characters removed."""
    return text.strip(KERNEL_SPACE)


def _fixup_radix(s: str, base: int) -> tuple[str, int]:
    """_parse_integer_fixup_radix: base 0 picks 16 for `0x<hexdigit>`, 8 for a leading 0."""
    if base == 0:
        if s[:1] == "0":
            base = 16 if s[1:2] in ("x", "X") and _digit(s[2:3], 16) is not None else 8
        else:
            base = 10
    if base == 16 and s[:1] == "0" and s[1:2] in ("x", "X"):
        s = s[2:]
    return s, base


def _digit(c: str, base: int) -> int | None:
    if not c:
        return None
    if "0" <= c <= "9":
        v = ord(c) - 48
    elif "a" <= c.lower() <= "f":
        v = ord(c.lower()) - 87
    else:
        return None
    return v if v < base else None


def _parse_integer(s: str, base: int) -> tuple[int, int, bool]:
    """_parse_integer: (value mod 2^64, chars consumed, overflowed)."""
    value = 0
    overflow = False
    n = 0
    for c in s:
        d = _digit(c, base)
        if d is None:
            break
        value = value * base + d
        if value > U64_MASK:
            overflow = True
            value &= U64_MASK
        n += 1
    return value, n, overflow


def _kstrtoull(s: str, base: int) -> int:
    s, base = _fixup_radix(s, base)
    value, n, overflow = _parse_integer(s, base)
    if overflow:
        raise KernelError(errno.ERANGE, "integer overflow")
    if n == 0:
        raise KernelError(errno.EINVAL, "not a number")
    rest = s[n:]
    if rest[:1] == "\n":
        rest = rest[1:]
    if rest:
        raise KernelError(errno.EINVAL, "trailing characters")
    return value


def kstrtoull(s: str, base: int = 0) -> int:
    """kstrtoull/kstrtou64: optional `+`, base-0 prefixes, one trailing newline."""
    if s[:1] == "+":
        s = s[1:]
    return _kstrtoull(s, base)


def kstrtoll(s: str, base: int = 0) -> int:
    """kstrtoll/kstrtos64: as kstrtoull with an optional sign; ERANGE outside s64."""
    if s[:1] == "-":
        value = _kstrtoull(s[1:], base)
        if value > S64_MAX + 1:
            raise KernelError(errno.ERANGE, "integer overflow")
        return -value
    value = kstrtoull(s, base)
    if value > S64_MAX:
        raise KernelError(errno.ERANGE, "integer overflow")
    return value


def kstrtoint(s: str, base: int = 0) -> int:
    """kstrtoint: kstrtoll narrowed to int; ERANGE if it does not fit."""
    value = kstrtoll(s, base)
    if not INT_MIN <= value <= INT_MAX:
        raise KernelError(errno.ERANGE, "integer overflow")
    return value


_MEMPARSE_SHIFT = {"k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}


def memparse(s: str) -> tuple[int, str]:
    """memparse(): simple_strtoull (base 0, wraps modulo 2^64, no sign, no ERANGE) and one
    optional K/M/G/T/P/E suffix in either case. Returns (value, unparsed rest)."""
    digits, base = _fixup_radix(s, 0)
    value, n, _ = _parse_integer(digits, base)
    rest = digits[n:]
    shift = _MEMPARSE_SHIFT.get(rest[:1].lower())
    if shift is not None:
        value = (value << shift) & U64_MASK
        rest = rest[1:]
    return value, rest


def page_counter_memparse(s: str, max_word: str = "max") -> int:
    """page_counter_memparse(): `max` or memparse bytes, nothing after; pages, rounded down
    and clamped to PAGE_COUNTER_MAX (memory.max, memory.swap.max)."""
    if s == max_word:
        return PAGE_COUNTER_MAX
    value, rest = memparse(s)
    if rest:
        raise KernelError(errno.EINVAL, "trailing characters")
    return min(value // PAGE_SIZE, PAGE_COUNTER_MAX)
