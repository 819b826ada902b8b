"""The simulated /dev/sgx_enclave: the daemon side of epcfs.protocol.

One connection is one open enclave fd. SO_PEERCRED names the process; each operation
charges that process's cgroup as it is at the time of the call, as `current` in the
kernel. Long ioctls go to the model in chunks, each followed by its cost in time (the
timing model), so the fs and the reclaimers keep running in between. When the peer
hangs up (close, exit, SIGKILL) the connection's enclave and vEPC are released, and an
operation still in progress for a process that is gone is abandoned, as the kernel's
ioctl returns at the next signal check.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable

import trio

from ..host.tracker import ProcessTracker
from ..model.constants import PAGE_SIZE, SGX_NR_LOW_PAGES, SGX_NR_TO_SCAN, SgxPageType
from ..model.enclave import Enclave, Vepc
from ..model.errors import Blocked, KernelError, NeedReclaim
from ..model.sgx import Fault, Sgx
from ..protocol import MAX_MESSAGE, Malformed, check, decode, encode
from .complaints import Complaints
from .reclaimers import Reclaimers
from .steps import Stepper

log = logging.getLogger(__name__)

ADD_CHUNK = 512
"""Pages per model call of a long ADD_PAGES: bounds how long one call holds the loop."""

RETRY_TICK = 0.001
"""Seconds before a faulting access or a blocked allocation tries again: the kernel
retries at once (NOPAGE, cond_resched); the tick lets the reclaimers run meanwhile."""


class Gone(Exception):
    """The peer process hung up while its request was in progress."""


class Connection:
    """One open enclave fd: its peer process, and the enclave/vEPC behind it."""

    def __init__(self, sock: trio.socket.SocketType, pid: int) -> None:
        self.sock = sock
        self.peek = socket.socket(fileno=os.dup(sock.fileno()))
        self.pid = pid
        self.enclave: Enclave | None = None
        self.vepc: Vepc | None = None

    def check_alive(self) -> None:
        """Raise Gone if the peer has closed its end (peek: nothing is consumed)."""
        try:
            data = self.peek.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError as e:
            raise Gone from e
        if not data:
            raise Gone


Handler = Callable[["EnclaveServer", Connection, dict], Awaitable[dict]]


class EnclaveServer:
    """Accepts connections on a unix socket and serves each in its own task."""

    def __init__(self, sgx: Sgx, tracker: ProcessTracker, sections: list[tuple[int, int]],
                 steps: Stepper, reclaimers: Reclaimers) -> None:
        self.sgx = sgx
        self.tracker = tracker
        self.sections = sections
        self.steps = steps
        self.reclaimers = reclaimers
        self.complaints = Complaints(log)

    async def serve(self, listening: socket.socket, *,
                    task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve connections on `listening`, a bound, listening SOCK_SEQPACKET socket
        (an EnclaveSocket's: bound before the mount exists, see daemon.serve)."""
        listener = trio.socket.from_stdlib_socket(listening)
        task_status.started()
        async with trio.open_nursery() as nursery:
            while True:
                sock, _ = await listener.accept()
                nursery.start_soon(self.connection, sock)

    async def connection(self, sock: trio.socket.SocketType) -> None:
        with sock:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                    struct.calcsize("3i"))
            pid, _, _ = struct.unpack("3i", creds)
            conn = Connection(sock, pid)
            try:
                while True:
                    data = await sock.recv(MAX_MESSAGE)
                    if not data:
                        break
                    reply = await self.dispatch(conn, data)
                    await sock.send(encode(reply))
            except (Gone, BrokenPipeError, ConnectionResetError):
                pass
            finally:
                conn.peek.close()
                self.release(conn)

    async def dispatch(self, conn: Connection, data: bytes) -> dict:
        try:
            request = decode(data)
            op = check(request)
        except Malformed as e:
            self.complaints.note(trio.current_time(), conn.pid, str(e))
            return {"errno": e.errno}
        try:
            return await HANDLERS[op](self, conn, request)
        except KernelError as e:
            return {"errno": e.errno, "count": e.count}
        except (ValueError, TypeError, KeyError):
            return {"errno": errno.EINVAL}
        except Gone:
            raise
        except Exception:
            log.exception("enclave request failed")
            return {"errno": errno.EIO}

    def release(self, conn: Connection) -> None:
        """The last reference to the fd is gone: free everything the connection held."""
        if conn.enclave is not None:
            self.sgx.release(conn.enclave)
        if conn.vepc is not None:
            self.sgx.release_vepc(conn.vepc)
        self.steps.settle()

    async def step(self, conn: Connection, fn: Callable, *args):
        """One model step on behalf of `conn`'s process, which must still be there; its
        cgroup is looked up afresh, as each allocation charges `current`'s."""
        conn.check_alive()
        self.tracker.cgroup_of(conn.pid)
        return await self.steps.run(fn, *args)

    async def until_done(self, conn: Connection, fn: Callable, *args):
        """A step the kernel would retry inside the call until it goes through."""
        while True:
            try:
                return await self.step(conn, fn, *args)
            except Blocked as e:
                await self.unblock(conn, e)

    async def unblock(self, conn: Connection, blocked: Blocked) -> None:
        """What the kernel does before trying again: a synchronous reclaim round in the
        caller's context (NeedReclaim), or, when that freed nothing because backing
        charges failed (an OOM victim is on its way out), a pause."""
        if isinstance(blocked, NeedReclaim):
            conn.check_alive()
            done = await self.reclaimers.round(blocked.root, blocked.nr_to_scan,
                                               blocked.charge_pid)
            if done.freed or not done.failed:
                return
        await trio.sleep(RETRY_TICK)

    async def reclaim_direct(self, conn: Connection) -> None:
        """sgx_reclaim_direct before each page of an EDMM ioctl, as timed rounds (the
        model's reclaim_direct does it in one call, where no other task would see the
        batches in flight): the caller's cgroup if near its limit, then globally if free
        pages run low."""
        conn.check_alive()
        css = self.sgx.h.misc_of(conn.pid)
        if self.sgx.should_reclaim(css):
            await self.reclaimers.round(css, SGX_NR_TO_SCAN, conn.pid)
        if self.sgx.should_reclaim_global(SGX_NR_LOW_PAGES):
            await self.reclaimers.round(self.sgx.h.root.misc, SGX_NR_TO_SCAN, conn.pid)

    async def fault_in(self, conn: Connection, fn: Callable, encl, first: int,
                       count: int) -> dict | None:
        """Accesses to `count` pages: each retried while the fault handler says RETRY.
        Returns a SIGBUS reply if the kernel would have sent one."""
        for i in range(first, first + count):
            while (outcome := await self.step(conn, fn, encl, conn.pid, i)) is Fault.RETRY:
                await trio.sleep(RETRY_TICK)
            if outcome is Fault.SIGBUS:
                return {"signal": "SIGBUS"}
        return None


def _enclave(conn: Connection) -> Enclave:
    """The ioctls need ECREATE first (SGX_ENCL_CREATED), else EINVAL."""
    if conn.enclave is None:
        raise KernelError(errno.EINVAL, "no enclave created on this fd")
    return conn.enclave


async def _info(srv: EnclaveServer, conn: Connection, req: dict) -> dict:
    return {"ok": True, "sections": [list(s) for s in srv.sections], "sgx2": True}


async def _create(srv: EnclaveServer, conn: Connection, req: dict) -> dict:
    if conn.enclave is not None:
        raise KernelError(errno.EINVAL, "enclave already created")
    conn.enclave = await srv.until_done(conn, srv.sgx.create, conn.pid, int(req["size"]))
    return {"ok": True}


async def _add(srv: EnclaveServer, conn: Connection, req: dict) -> dict:
    encl = _enclave(conn)
    offset, count = int(req["offset"]), int(req["count"])
    ptype = SgxPageType.TCS if req["tcs"] else SgxPageType.REG
    done = 0
    while done < count:
        n = min(ADD_CHUNK, count - done)
        try:
            done += await srv.step(conn, srv.sgx.add_pages, encl, conn.pid, offset + done, n,
                                   bool(req["measured"]), ptype)
        except KernelError as e:
            return {"errno": e.errno, "count": done + e.count}
        except Blocked as e:
            done += e.count
            await srv.unblock(conn, e)
    return {"ok": True, "count": done}


async def _init(srv: EnclaveServer, conn: Connection, req: dict) -> dict:
    await srv.step(conn, srv.sgx.init, _enclave(conn))
    return {"ok": True}


async def _touch(srv: EnclaveServer, conn: Connection, req: dict) -> dict:
    encl = _enclave(conn)
    return await srv.fault_in(conn, srv.sgx.fault, encl, int(req["offset"]),
                              int(req["count"])) or {"ok": True}


async def _augment(srv: EnclaveServer, conn: Connection, req: dict) -> dict:
    encl = _enclave(conn)
    return await srv.fault_in(conn, srv.sgx.eaug, encl, int(req["offset"]),
                              int(req["count"])) or {"ok": True}


def _edmm(method: str, *extra: str) -> Handler:
    """An EDMM ioctl, page by page so other tasks run between pages; before each page
    the series' direct reclaim, run here as timed rounds."""

    async def handler(srv: EnclaveServer, conn: Connection, req: dict) -> dict:
        encl = _enclave(conn)
        first, count = int(req["offset"]), int(req["count"])
        args = [SgxPageType(int(req[name])) for name in extra]
        srv.sgx.check_edmm(encl, first, count)
        operation = functools.partial(getattr(srv.sgx, method), direct_reclaim=False)
        for c in range(count):
            await srv.reclaim_direct(conn)
            try:
                await srv.until_done(conn, operation, encl, conn.pid, first + c, 1, *args)
            except KernelError as e:
                return {"errno": e.errno, "count": c}
        return {"ok": True, "count": count}

    return handler


async def _accept(srv: EnclaveServer, conn: Connection, req: dict) -> dict:
    """EACCEPT runs inside the enclave: each page is accessed (faulted in) first."""
    encl = _enclave(conn)
    first, count = int(req["offset"]), int(req["count"])
    for c in range(count):
        bus = await srv.fault_in(conn, srv.sgx.fault, encl, first + c, 1)
        if bus:
            return bus
        try:
            await srv.step(conn, srv.sgx.accept, encl, first + c, 1)
        except KernelError as e:
            return {"errno": e.errno, "count": c}
    return {"ok": True, "count": count}


async def _vepc(srv: EnclaveServer, conn: Connection, req: dict) -> dict:
    if conn.vepc is None:
        conn.vepc = srv.sgx.create_vepc(conn.pid)
    start = conn.vepc.nr_pages
    return await srv.fault_in(conn, srv.sgx.vepc_fault, conn.vepc, start,
                              int(req["count"])) or {"ok": True}


async def _declare(srv: EnclaveServer, conn: Connection, req: dict) -> dict:
    pages = -(-int(req["bytes"]) // PAGE_SIZE)
    await srv.step(conn, srv.sgx.h.mem.declare_memory, conn.pid, pages)
    return {"ok": True}


HANDLERS: dict[str, Handler] = {
    "info": _info,
    "create": _create,
    "add": _add,
    "init": _init,
    "touch": _touch,
    "augment": _augment,
    "modify_types": _edmm("modify_types", "page_type"),
    "restrict": _edmm("restrict_permissions"),
    "accept": _accept,
    "remove": _edmm("remove_pages"),
    "vepc": _vepc,
    "declare": _declare,
}
