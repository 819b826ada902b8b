"""The enclave socket's file: bound before the mount exists, locked, and unlinked only
by the daemon that holds its lock.

`PATH.lock` beside the socket carries an exclusive flock for the daemon's lifetime: a
second daemon started for the same socket fails to take it and leaves the socket alone
(before the lock, it unlinked the first daemon's socket and, on its exit, its own).
The lock file stays: unlinking it would let a third daemon lock a fresh file while the
second still holds the old one.

Its mode follows Debian's udev rule for /dev/sgx_enclave: group `sgx`, 0660, where that
group exists, else root only (0600); `mode` widens it (e.g. 0o666: any local user may
build enclaves, charged to their own cgroup, as with a world-writable device node).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import grp
import logging
import os
import socket
import time

log = logging.getLogger(__name__)

DEVICE_GROUP = "sgx"
"""The group Debian's udev rules give /dev/sgx_enclave and /dev/sgx_provision."""

BACKLOG = 128
"""Connections waiting to be accepted: test_sgx runs open a handful at once."""


LOCK_WAIT = 5.0
"""Seconds to wait for the lock: a daemon whose mount was just lifted (fusermount3 -u)
is still on its way out, and `fusermount3 -u X; epcfs mount X` must work."""


class SocketBusy(RuntimeError):
    """Another live daemon holds this socket's lock."""


class EnclaveSocket:
    """A listening SOCK_SEQPACKET unix socket at `path`, with its lock held."""

    def __init__(self, path: str, mode: int | None = None) -> None:
        self.path = path
        self.mode = mode
        self.lock_fd: int | None = None
        self.sock: socket.socket | None = None

    @property
    def lock_path(self) -> str:
        return self.path + ".lock"

    def open(self) -> socket.socket:
        """Lock, clear a dead daemon's socket file, bind, set mode and group, listen.

        SocketBusy if a live daemon holds the lock; OSError for the file system's
        refusals. Nobody can connect before the mode is set: connect() is refused
        until listen().
        """
        os.makedirs(os.path.dirname(self.path) or ".", mode=0o755, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    os.close(fd)
                    raise
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise SocketBusy(f"{self.path}: another epcfs daemon is serving it") from e
                time.sleep(0.05)
        self.lock_fd = fd
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)  # a dead daemon's: we hold the lock
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            try:
                sock.bind(self.path)
                self._set_access()
                sock.listen(BACKLOG)
            except BaseException:
                sock.close()
                raise
        except BaseException:
            self.close()
            raise
        self.sock = sock
        return sock

    def _set_access(self) -> None:
        try:
            gid = grp.getgrnam(DEVICE_GROUP).gr_gid
        except KeyError:
            gid = None
        mode = 0o600 if gid is None else 0o660
        if gid is not None:
            os.chown(self.path, -1, gid)
        os.chmod(self.path, mode | (self.mode or 0))

    def close(self) -> None:
        """Stop listening and unlink the socket (ours: we hold the lock); then unlock."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None
