"""Client side of the enclave protocol, for test_sgx, `epcfs load` and Python users.

    with Enclave() as encl:            # like open("/dev/sgx_enclave")
        encl.create(size)
        encl.add(0, 2, measured=True, tcs=True)
        encl.init()

Errors come back as OSError with the kernel's errno (and `count`, the pages done before
the error, where the ioctl reports one). A fault the kernel answers with SIGBUS raises
SignalOutcome; the caller decides whether to die of it, as a real process would.
"""

from __future__ import annotations

import os
import socket

from .protocol import MAX_MESSAGE, OPS, decode, default_socket, encode

CGROUP_ROOT = "/sys/fs/cgroup"


class SignalOutcome(Exception):
    """The kernel would have sent this process a signal (e.g. SIGBUS) instead of a reply."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.signal = name


def socket_path() -> str:
    """$EPCFS_SOCKET (set by `epcfs run`), else the default for the daemon at /sys/fs/cgroup."""
    return os.environ.get("EPCFS_SOCKET") or default_socket(CGROUP_ROOT)


class Enclave:
    """One connection = one open enclave fd. Not thread-safe, like an fd shared unlocked."""

    def __init__(self, path: str | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            self.sock.connect(path or socket_path())
        except OSError:
            self.sock.close()
            raise

    def call(self, op: str, **fields) -> dict:
        missing = set(OPS[op]) - set(fields)
        if missing:
            raise TypeError(f"{op}: missing {sorted(missing)}")
        self.sock.send(encode({"op": op, **fields}))
        data = self.sock.recv(MAX_MESSAGE)
        if not data:
            raise ConnectionError("epcfs closed the enclave connection")
        reply = decode(data)
        if "signal" in reply:
            raise SignalOutcome(reply["signal"])
        if "errno" in reply:
            err = OSError(reply["errno"], os.strerror(reply["errno"]))
            err.count = reply.get("count", 0)
            raise err
        return reply

    def info(self) -> list[tuple[int, int]]:
        return [tuple(s) for s in self.call("info")["sections"]]

    def create(self, size: int) -> None:
        self.call("create", size=size)

    def add(self, offset: int, count: int, *, measured: bool, tcs: bool = False) -> int:
        return self.call("add", offset=offset, count=count, measured=measured, tcs=tcs)["count"]

    def init(self) -> None:
        self.call("init")

    def touch(self, offset: int, count: int = 1) -> None:
        self.call("touch", offset=offset, count=count)

    def augment(self, offset: int, count: int = 1) -> None:
        self.call("augment", offset=offset, count=count)

    def modify_types(self, offset: int, count: int, page_type: int) -> int:
        return self.call("modify_types", offset=offset, count=count, page_type=page_type)["count"]

    def restrict(self, offset: int, count: int, permissions: int) -> int:
        return self.call("restrict", offset=offset, count=count,
                         permissions=permissions)["count"]

    def accept(self, offset: int, count: int) -> None:
        self.call("accept", offset=offset, count=count)

    def remove(self, offset: int, count: int) -> int:
        return self.call("remove", offset=offset, count=count)["count"]

    def vepc(self, count: int) -> None:
        self.call("vepc", count=count)

    def declare(self, nbytes: int) -> None:
        self.call("declare", bytes=nbytes)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Enclave:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
