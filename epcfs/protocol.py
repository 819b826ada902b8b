"""The enclave protocol: epcfs's stand-in for /dev/sgx_enclave and its ioctls.

A unix SOCK_SEQPACKET connection is one open enclave fd: the daemon learns the process
from SO_PEERCRED (and so the cgroup to charge), and a closed connection — close(),
exit, SIGKILL — releases the enclave, as the last fput of the real fd does.

Each request and each reply is one JSON object in one datagram. A request names an
`op` from OPS with that op's fields; a reply is {"ok": true, …} or
{"errno": N, "count": pages done before the error} or {"signal": "SIGBUS"} when the
kernel would have sent the process that signal (a fault it cannot serve).

Before any handler runs, `check` holds a request to OPS, the table of each op's fields
with their JSON types and ranges: a malformed request gets {"errno": EINVAL} (what the
ioctl's own argument checks return) and changes nothing. Adding an op is adding a row.
"""

from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass

PAGE_SIZE = 4096
MAX_MESSAGE = 65536
"""Datagram size limit; every message is tiny, the bound only guards the reader."""

U64_MAX = (1 << 64) - 1
"""The ioctls' offsets and lengths are u64 bytes: anything else cannot reach the kernel."""

MAX_PAGES = U64_MAX // PAGE_SIZE
"""The largest page offset or count whose byte value is still a u64."""

MAX_DEPTH = 8
"""JSON nesting a reply to a malformed message may cost us: every valid request is flat."""


@dataclass(frozen=True)
class Field:
    """One request field: its JSON type, its range, and the errno the real ioctl returns
    when the value it stands for is out of that range (its copy_from_user'd struct)."""

    kind: type
    low: int = 0
    high: int = MAX_PAGES
    errno: int = errno.EINVAL


PAGES = Field(int)
"""An offset or access count in pages: a u64 the kernel takes as is."""
LENGTH = Field(int, low=1)
"""An ioctl's length in pages: sgx_validate_offset_length() refuses 0 with EINVAL."""
FLAG = Field(bool)
"""A flag bit (SGX_PAGE_MEASURE, the TCS page type): true or false, nothing else."""

OPS: dict[str, dict[str, Field]] = {
    # op: fields (page offsets and counts are in pages from the enclave base)
    "info": {},  # → sections [[node, bytes], …] and sgx2: what CPUID leaf 0x12 reports
    # SGX_IOC_ENCLAVE_CREATE: SECS + first VA page; secs.size in bytes, a u64
    "create": {"size": Field(int, high=U64_MAX)},
    # SGX_IOC_ENCLAVE_ADD_PAGES → count
    "add": {"offset": PAGES, "count": LENGTH, "measured": FLAG, "tcs": FLAG},
    "init": {},  # SGX_IOC_ENCLAVE_INIT
    "touch": {"offset": PAGES, "count": PAGES},  # access pages from inside: ELDU (#PF)
    "augment": {"offset": PAGES, "count": PAGES},  # #PF on unbacked pages: EAUG
    # SGX_IOC_ENCLAVE_MODIFY_TYPES; page_type is a u64 masked by SGX_PAGE_TYPE_MASK
    "modify_types": {"offset": PAGES, "count": LENGTH, "page_type": Field(int, high=U64_MAX)},
    # SGX_IOC_ENCLAVE_RESTRICT_PERMISSIONS; permissions is a u64 (SECINFO bits)
    "restrict": {"offset": PAGES, "count": LENGTH, "permissions": Field(int, high=U64_MAX)},
    "accept": {"offset": PAGES, "count": PAGES},  # EACCEPT from inside, page by page
    "remove": {"offset": PAGES, "count": LENGTH},  # SGX_IOC_ENCLAVE_REMOVE_PAGES → count
    "vepc": {"count": PAGES},  # a VMM faulting `count` guest pages of /dev/sgx_vepc
    # memory the process holds (source image), charged to its memcg: a size_t, never < 0
    "declare": {"bytes": Field(int, high=U64_MAX)},
    "stats": {},  # read-only: a row per cgroup for `epcfs top` (EPC, memory, reclaim)
}
"""Every op and its fields. `check` holds each request to this before any handler runs."""


class Malformed(ValueError):
    """A request that no ioctl would accept: `errno` is the kernel's answer, the message
    says why in a few words (for one log line)."""

    def __init__(self, err: int, why: str) -> None:
        super().__init__(why)
        self.errno = err


def check(request: dict) -> str:
    """Hold a decoded request to OPS; return its op, or raise Malformed.

    Types are exact (a bool is not a count, 1.0 is not 1); unknown fields are ignored,
    as a newer client may send more.
    """
    op = request.get("op")
    if not isinstance(op, str) or op not in OPS:
        raise Malformed(errno.EINVAL, "unknown op")
    for name, field in OPS[op].items():
        if name not in request:
            raise Malformed(errno.EINVAL, f"{op}: no {name}")
        value = request[name]
        if type(value) is not field.kind:
            raise Malformed(field.errno, f"{op}: {name} is not {field.kind.__name__}")
        if field.kind is int and not field.low <= value <= field.high:
            raise Malformed(field.errno, f"{op}: {name} out of range")
    return op


PAGE_TYPE_TCS = 1
PAGE_TYPE_REG = 2
PAGE_TYPE_TRIM = 4
"""SGX_PAGE_TYPE_* values for modify_types, as in the SGX uapi."""


def encode(message: dict) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def decode(data: bytes) -> dict:
    """One datagram -> a JSON object; Malformed (EINVAL) for anything else, nesting
    deeper than MAX_DEPTH included, without ever recursing deeply (json's C decoder
    would, and a RecursionError would cost a traceback)."""
    if _depth(data) > MAX_DEPTH:
        raise Malformed(errno.EINVAL, "nested too deeply")
    try:
        message = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise Malformed(errno.EINVAL, "not JSON") from e
    if not isinstance(message, dict):
        raise Malformed(errno.EINVAL, "not a JSON object")
    return message


def _depth(data: bytes) -> int:
    """An upper bound on the JSON nesting of `data`: brackets outside strings are not
    told apart from those inside, which only ever overestimates."""
    depth = deepest = 0
    for byte in data.translate(None, _NOT_BRACKETS):
        depth += 1 if byte in b"[{" else -1
        deepest = max(deepest, depth)
    return deepest


_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


SOCKET_DIR = "/run/epcfs/sockets"
"""Where default sockets (and their lock files) live: never inside a mountpoint, since a
daemon must not touch its own mount before serving (it would wait on itself forever)."""


def default_socket(mountpoint: str) -> str:
    """Where the daemon serving `mountpoint` listens unless told otherwise.

    Derived from the mountpoint so that a client finds the daemon behind
    /sys/fs/cgroup without configuration, and two daemons never collide.
    """
    return os.path.join(SOCKET_DIR, f"{mount_key(mountpoint)}.sock")


def mount_key(mountpoint: str) -> str:
    """`mountpoint` as one file name (its path with - for /), naming what belongs to the
    daemon serving it: its socket, its log."""
    return os.path.abspath(mountpoint).strip("/").replace("/", "-") or "-"
