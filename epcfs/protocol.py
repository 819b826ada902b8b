"""The enclave protocol: epcfs's stand-in for /dev/sgx_enclave and its ioctls.

A unix SOCK_SEQPACKET connection is one open enclave fd: the daemon learns the process
from SO_PEERCRED (and so the cgroup to charge), and a closed connection — close(),
exit, SIGKILL — releases the enclave, as the last fput of the real fd does.

Each request and each reply is one JSON object in one datagram. A request names an
`op` from OPS with that op's fields; a reply is {"ok": true, …} or
{"errno": N, "count": pages done before the error} or {"signal": "SIGBUS"} when the
kernel would have sent the process that signal (a fault it cannot serve).
"""

from __future__ import annotations

import json
import os

PAGE_SIZE = 4096
MAX_MESSAGE = 65536
"""Datagram size limit; every message is tiny, the bound only guards the reader."""

OPS: dict[str, tuple[str, ...]] = {
    # op: fields (page offsets and counts are in pages from the enclave base)
    "info": (),  # → sections [[node, bytes], …] and sgx2: what CPUID leaf 0x12 reports
    "create": ("size",),  # SGX_IOC_ENCLAVE_CREATE: SECS + first VA page; size in bytes
    "add": ("offset", "count", "measured", "tcs"),  # SGX_IOC_ENCLAVE_ADD_PAGES → count
    "init": (),  # SGX_IOC_ENCLAVE_INIT
    "touch": ("offset", "count"),  # access pages from inside: ELDU evicted ones (#PF)
    "augment": ("offset", "count"),  # #PF on unbacked pages of an initialized enclave: EAUG
    "modify_types": ("offset", "count", "page_type"),  # SGX_IOC_ENCLAVE_MODIFY_TYPES
    "restrict": ("offset", "count", "permissions"),  # SGX_IOC_ENCLAVE_RESTRICT_PERMISSIONS
    "accept": ("offset", "count"),  # EACCEPT from inside the enclave, page by page
    "remove": ("offset", "count"),  # SGX_IOC_ENCLAVE_REMOVE_PAGES → count
    "vepc": ("count",),  # a VMM faulting `count` guest pages of /dev/sgx_vepc
    "declare": ("bytes",),  # memory the process holds (source image), charged to its memcg
    "stats": (),  # read-only: a row per cgroup for `epcfs top` (EPC, memory, reclaim)
}

PAGE_TYPE_TCS = 1
PAGE_TYPE_REG = 2
PAGE_TYPE_TRIM = 4
"""SGX_PAGE_TYPE_* values for modify_types, as in the SGX uapi."""


def encode(message: dict) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def decode(data: bytes) -> dict:
    message = json.loads(data)
    if not isinstance(message, dict):
        raise ValueError("message is not an object")
    return message


def default_socket(mountpoint: str) -> str:
    """Where the daemon serving `mountpoint` listens unless told otherwise.

    Derived from the mountpoint so that a client finds the daemon behind
    /sys/fs/cgroup without configuration, and two daemons never collide.
    """
    escaped = os.path.abspath(mountpoint).strip("/").replace("/", "-") or "-"
    return os.path.join("/run/epcfs", f"{escaped}.sock")
