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
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable

import trio

from ..host.tracker import ProcessTracker
from ..model.constants import PAGE_SIZE, SgxPageType
from ..model.enclave import Enclave, Vepc
from ..model.engine import Steps
from ..model.errors import KernelError
from ..model.sgx import Fault, Sgx
from ..protocol import MAX_MESSAGE, Malformed, check, decode, encode
from .complaints import Complaints
from .steps import Stepper

log = logging.getLogger(__name__)

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
                 steps: Stepper) -> None:
        self.sgx = sgx
        self.tracker = tracker
        self.sections = sections
        self.steps = steps
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
                    self.steps.tracer.replied(pid, reply)
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
        return await self.steps.run(fn, *args, css=self.sgx.h.misc_of(conn.pid))

    async def operation(self, conn: Connection, name: str, steps: Steps):
        """An engine operation (an ioctl with its allocations and the reclaim they need)
        on behalf of `conn`'s process, driven to its end; abandoned (cleaned up as at a
        signal check) once the process is gone. Its cgroup is looked up afresh before
        each step, as each allocation charges `current`'s."""

        def alive() -> None:
            conn.check_alive()
            self.tracker.cgroup_of(conn.pid)

        return await self.steps.drive(name, steps, css=self.sgx.h.misc_of(conn.pid),
                                      pid=conn.pid, alive=alive)

    async def access(self, conn: Connection, name: str, steps: Steps) -> dict | None:
        """An access operation (Sgx.touch, Sgx.faults) driven to its end: a fault that
        gets RETRY waits, backing off (Stepper.drive). Returns a SIGBUS reply if the
        kernel would have sent one."""
        outcome = await self.operation(conn, name, steps)
        return {"signal": "SIGBUS"} if outcome is Fault.SIGBUS else None


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
    conn.enclave = await srv.operation(conn, "create",
                                       srv.sgx.create.steps(conn.pid, int(req["size"])))
    return {"ok": True}


async def _add(srv: EnclaveServer, conn: Connection, req: dict) -> dict:
    encl = _enclave(conn)
    offset, count = int(req["offset"]), int(req["count"])
    ptype = SgxPageType.TCS if req["tcs"] else SgxPageType.REG
    done = await srv.operation(conn, "add_pages", srv.sgx.add_pages.steps(
        encl, conn.pid, offset, count, bool(req["measured"]), ptype))
    return {"ok": True, "count": done}


async def _init(srv: EnclaveServer, conn: Connection, req: dict) -> dict:
    await srv.step(conn, srv.sgx.init, _enclave(conn))
    return {"ok": True}


async def _touch(srv: EnclaveServer, conn: Connection, req: dict) -> dict:
    encl = _enclave(conn)
    return await srv.access(conn, "touch", srv.sgx.touch.steps(
        encl, conn.pid, int(req["offset"]), int(req["count"]))) or {"ok": True}


async def _augment(srv: EnclaveServer, conn: Connection, req: dict) -> dict:
    encl = _enclave(conn)
    return await srv.access(conn, "augment", srv.sgx.faults.steps(
        srv.sgx.eaug, encl, conn.pid, int(req["offset"]), int(req["count"]))) or {"ok": True}


def _edmm(method: str, *extra: str) -> Handler:
    """An EDMM ioctl: the model's operation (direct reclaim, then the page, a step each),
    driven page by page so other tasks run in between. A failure's reply carries the
    pages done (dispatch)."""

    async def handler(srv: EnclaveServer, conn: Connection, req: dict) -> dict:
        encl = _enclave(conn)
        first, count = int(req["offset"]), int(req["count"])
        args = [SgxPageType(int(req[name])) for name in extra]
        done = await srv.operation(conn, method, getattr(srv.sgx.edmm, method).steps(
            encl, conn.pid, first, count, *args))
        return {"ok": True, "count": done}

    return handler


async def _accept(srv: EnclaveServer, conn: Connection, req: dict) -> dict:
    """EACCEPT runs inside the enclave: the pages are accessed (faulted in) first, then
    accepted, a run at a time."""
    encl = _enclave(conn)
    first, count = int(req["offset"]), int(req["count"])
    if bus := await srv.access(conn, "touch", srv.sgx.touch.steps(encl, conn.pid, first,
                                                                   count)):
        return bus
    await srv.step(conn, srv.sgx.edmm.accept, encl, first, count)
    return {"ok": True, "count": count}


async def _vepc(srv: EnclaveServer, conn: Connection, req: dict) -> dict:
    if conn.vepc is None:
        conn.vepc = srv.sgx.create_vepc(conn.pid)
    start = conn.vepc.nr_pages
    return await srv.access(conn, "vepc", srv.sgx.faults.steps(
        srv.sgx.vepc_fault, conn.vepc, conn.pid, start, int(req["count"]))) or {"ok": True}


async def _declare(srv: EnclaveServer, conn: Connection, req: dict) -> dict:
    pages = -(-int(req["bytes"]) // PAGE_SIZE)
    await srv.step(conn, srv.sgx.h.mem.declare_memory, conn.pid, pages)
    return {"ok": True}


async def _stats(srv: EnclaveServer, conn: Connection, req: dict) -> dict:
    return {"ok": True, **srv.steps.tracer.stats(srv.sgx)}


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
    "stats": _stats,
}
