"""A stand-in for the daemon's enclave server: the protocol over SOCK_SEQPACKET, in a thread.

It keeps just enough state per connection to answer the selftest the way a correct
SGX2 kernel does (zeroed EDMM probes fail with EINVAL, restricting a TCS page fails with
EINVAL, removing a trimmed page nobody EACCEPTed fails with EPERM). `rules` overrides an
op: a function (conn, message) → reply dict, or None for the default answer, or DROP to
close the connection without answering. Every request is logged with the peer's pid.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

DROP = object()


@dataclass
class Conn:
    sock: socket.socket
    pid: int
    trimmed: set[int] = field(default_factory=set)
    accepted: set[int] = field(default_factory=set)
    tcs: set[int] = field(default_factory=set)
    closed: threading.Event = field(default_factory=threading.Event)


class FakeEpc:
    def __init__(self, path: str, capacity: int = 1 << 20, sgx2: bool | None = None) -> None:
        self.path = path
        self.capacity = capacity
        self.sgx2 = sgx2
        self.rules: dict[str, Callable[[Conn, dict], object]] = {}
        self.log: list[tuple[int, dict]] = []
        self.conns: list[Conn] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._listener.bind(path)
        self._listener.listen(64)
        self._listener.settimeout(0.1)
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    # -- queries used by the tests ---------------------------------------------------------

    def ops(self, name: str | None = None) -> list[dict]:
        with self._lock:
            return [m for _, m in self.log if name is None or m["op"] == name]

    def pids(self) -> set[int]:
        with self._lock:
            return {pid for pid, _ in self.log}

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.01)
        return predicate()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._listener.close()
        for c in self.conns:
            with contextlib.suppress(OSError):
                c.sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    # -- serving ---------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            pid, _, _ = struct.unpack("3i", sock.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
            conn = Conn(sock, pid)
            self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: Conn) -> None:
        try:
            while True:
                data = conn.sock.recv(65536)
                if not data:
                    return
                message = json.loads(data)
                with self._lock:
                    self.log.append((conn.pid, message))
                rule = self.rules.get(message["op"])
                reply = rule(conn, message) if rule else None
                if reply is DROP:
                    return
                if reply is None:
                    reply = self._default(conn, message)
                conn.sock.send(json.dumps(reply).encode())
        except OSError:
            return
        finally:
            conn.closed.set()
            with contextlib.suppress(OSError):
                conn.sock.close()

    def _default(self, conn: Conn, m: dict) -> dict:
        op = m["op"]
        if op == "info":
            reply: dict = {"ok": True, "sections": [[0, self.capacity]]}
            if self.sgx2 is not None:
                reply["sgx2"] = self.sgx2
            return reply
        pages = range(m.get("offset", 0), m.get("offset", 0) + m.get("count", 0))
        if op == "add" and m["tcs"]:
            conn.tcs.update(pages)
        if op in ("modify_types", "restrict") and not pages:
            return {"errno": errno.EINVAL, "count": 0}
        if op == "restrict" and conn.tcs & set(pages):
            return {"errno": errno.EINVAL, "count": 0}
        if op == "modify_types" and m["page_type"] == 4:
            conn.trimmed.update(pages)
        if op == "accept":
            conn.accepted.update(pages)
        if op == "remove":
            if any(p in conn.trimmed and p not in conn.accepted for p in pages):
                return {"errno": errno.EPERM, "count": 0}
            conn.trimmed.difference_update(pages)
            conn.accepted.difference_update(pages)
        if op in ("add", "modify_types", "restrict", "remove"):
            return {"ok": True, "count": len(pages)}
        return {"ok": True}
