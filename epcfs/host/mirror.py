"""A private subtree of a real cgroup hierarchy that mirrors the epcfs cgroup tree.

Placed below the daemon's own cgroup (on a v2 host, the one systemd delegates with
`Delegate=yes`; on a v1 host, its cgroup in the name-only v2 hierarchy), with no
controllers enabled, so neither the no-internal-process rule nor the host's resource
accounting changes. Its top directory stands for the epcfs root, `top/a/b` for epcfs's
`/a/b`. Processes not in the subtree at all are in the epcfs root too.

The v1 layout's two hierarchies (a process is in one cgroup of each) get one mirror
each, in the named v1 hierarchies `epcfs.misc` and `epcfs.memory` (`mount -t cgroup -o
none,name=…`, which a host with cgroup v1 support allows its root to do).

Everything is reached through a directory fd opened before the FUSE mount: `epcfs run`
mounts epcfs over /sys/fs/cgroup, and a path lookup through our own mount from the
daemon would deadlock it.

The top is named `epcfs-<pid namespace inode>-<pid>-<start time>` after the daemon, so
the next daemon started in the same cgroup can tell a mirror left by a SIGKILLed daemon
(its process is gone) and remove it. A mirror of a daemon in another pid namespace is
removed only by a daemon in the initial namespace, and only once no process is left in
that namespace: elsewhere its liveness cannot be told.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import time

log = logging.getLogger(__name__)

_NAME = re.compile(r"epcfs-(\d+)-(\d+)-(\d+)")

PROC_PID_INIT_INO = 0xEFFFFFFC
"""The inode of the initial pid namespace, fixed by the kernel (include/linux/proc_ns.h):
the one namespace whose /proc shows the processes of every other."""

TEARDOWN_ROUNDS = 100
"""Passes that move processes out of a cgroup being removed: members may still be
forking while they are moved; each pass takes what the last one missed."""

TEARDOWN_PAUSE = 0.005
"""Seconds between passes that found members: a process killed just before the teardown
is listed until its exit reaches cgroup_exit(), and moving it fails with ESRCH; a pause
lets it go, so that 100 passes cover half a second rather than a busy spin."""


def _self_identity() -> tuple[int, int, int]:
    """(pid namespace inode, pid, start time in ticks) of this process."""
    return (os.stat("/proc/self/ns/pid").st_ino, os.getpid(), _start_time(os.getpid()))


def _start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def own_cgroup(key: str = "") -> str | None:
    """This process's cgroup path in the hierarchy whose controller field in
    /proc/self/cgroup is `key` ("": cgroup2; "name=X": the named v1 hierarchy X)."""
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if controllers == key:
                return path
    return None


def own_cgroup_dir() -> tuple[str, str]:
    """(directory, hierarchy path) of this process's cgroup in a mounted cgroup2
    hierarchy. OSError if there is none."""
    path = own_cgroup()
    if path is None:
        raise OSError(errno.ENOENT, "not in any cgroup2 hierarchy")
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[sep + 1] != "cgroup2":
                continue
            root, mountpoint = fields[3], fields[4]
            if root == "/" or path == root or path.startswith(root + "/"):
                rel = path if root == "/" else path[len(root):]
                directory = mountpoint.rstrip("/") + rel
                if os.path.isdir(directory):
                    return directory, path
    raise OSError(errno.ENOENT, "no cgroup2 hierarchy mounted")


LEGACY_NAME = "epcfs.{controller}"
"""The named v1 hierarchy mirroring the v1 layout's `controller` hierarchy. One per
controller for the whole host, shared by every daemon (each has its own subtree in
it): the kernel keeps a named hierarchy that ever had a child cgroup for good, so a
name per daemon would leave one behind in every process's /proc/PID/cgroup each time."""

MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
MNT_DETACH = 2


def _open_named_hierarchy(name: str) -> tuple[int, str]:
    """An fd of this process's cgroup in the named v1 hierarchy `name` (created if
    new), and that cgroup's path. The hierarchy is mounted on a scratch directory only
    long enough to open it: nothing shows in any mount table afterwards."""
    import ctypes
    import tempfile

    libc = ctypes.CDLL(None, use_errno=True)
    scratch = tempfile.mkdtemp(prefix="epcfs-mirror-")
    try:
        if libc.mount(b"cgroup", scratch.encode(), b"cgroup", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                      f"none,name={name}".encode()) < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mount -t cgroup -o none,name={name}: {os.strerror(err)}")
        try:
            path = own_cgroup(f"name={name}") or "/"
            fd = os.open(scratch + path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        finally:
            libc.umount2(scratch.encode(), MNT_DETACH)
    finally:
        os.rmdir(scratch)
    return fd, path


class Mirror:
    """The real twin of the epcfs tree. Paths are epcfs cgroup paths ("/" or "/a/b")."""

    def __init__(self, legacy: str | None = None) -> None:
        """Create the subtree (removing stale ones first): in the daemon's cgroup2
        cgroup, or with `legacy` (a v1 layout hierarchy's controller) in the named v1
        hierarchy LEGACY_NAME. OSError if this process cannot create cgroups there."""
        if legacy is None:
            self.key = ""
            directory, path = own_cgroup_dir()
            self.parent_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        else:
            self.key = "name=" + LEGACY_NAME.format(controller=legacy)
            self.parent_fd, path = _open_named_hierarchy(self.key[5:])
            directory = f"cgroup v1 hierarchy {self.key}:{path}"
        try:
            self._remove_stale()
            name = "epcfs-{}-{}-{}".format(*_self_identity())
            os.mkdir(name, dir_fd=self.parent_fd)
            self.fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC,
                              dir_fd=self.parent_fd)
        except BaseException:
            os.close(self.parent_fd)
            raise
        self.name = name
        self.where = os.path.join(directory, name)
        self.path = path.rstrip("/") + "/" + name
        """The top's path as /proc/PID/cgroup shows it."""

    # -- the tree --------------------------------------------------------------------

    def mkdir(self, path: str) -> None:
        os.mkdir(_rel(path), dir_fd=self.fd)

    def rmdir(self, path: str) -> None:
        os.rmdir(_rel(path), dir_fd=self.fd)

    # -- membership ------------------------------------------------------------------

    def procs(self, path: str) -> list[int]:
        """The mirror's cgroup.procs for epcfs's `path`."""
        return [int(x) for x in self._read(path, "cgroup.procs").split()]

    def move(self, pid: int, path: str) -> None:
        """Write `pid` to the mirror's cgroup.procs (OSError with the kernel's errno)."""
        self._write(path, "cgroup.procs", str(pid))

    def cgroup_of(self, pid: int) -> str | None:
        """The epcfs path of `pid`'s cgroup, from /proc/PID/cgroup: None if outside the
        mirror (epcfs root) or gone."""
        path = ""
        try:
            with open(f"/proc/{pid}/cgroup") as f:
                for line in f:
                    _, controllers, where = line.rstrip("\n").split(":", 2)
                    if controllers == self.key:
                        path = where
                        break
        except OSError:
            return None
        if path == self.path:
            return "/"
        if path.startswith(self.path + "/"):
            return path[len(self.path):]
        return None

    def events(self, path: str) -> tuple[bool, bool]:
        """(populated, frozen) from the mirror's cgroup.events."""
        fields = dict(line.split() for line in self._read(path, "cgroup.events").splitlines())
        return fields.get("populated") == "1", fields.get("frozen") == "1"

    def kill(self, path: str) -> None:
        self._write(path, "cgroup.kill", "1")

    def freeze(self, path: str, freeze: bool) -> None:
        self._write(path, "cgroup.freeze", "1" if freeze else "0")

    # -- removal ---------------------------------------------------------------------

    def close(self) -> None:
        """Remove the subtree; processes still in it go to the daemon's own cgroup."""
        self._teardown(self.fd, self.where)
        os.close(self.fd)
        with contextlib.suppress(OSError):
            os.rmdir(self.name, dir_fd=self.parent_fd)
        os.close(self.parent_fd)

    def _remove_stale(self) -> None:
        ns = os.stat("/proc/self/ns/pid").st_ino
        live_namespaces: set[int] | None = None
        for name in os.listdir(self.parent_fd):
            m = _NAME.fullmatch(name)
            if m is None:
                continue
            if int(m[1]) == ns:
                if _start_time(int(m[2])) == int(m[3]):
                    continue  # its daemon is alive
            else:
                # A daemon in another pid namespace: its pid means nothing here, but a
                # namespace that no process is in any more has no daemon left either.
                # Only the initial namespace sees every process, so only it can tell.
                if ns != PROC_PID_INIT_INO:
                    continue
                if live_namespaces is None:
                    live_namespaces = _pid_namespaces()
                if int(m[1]) in live_namespaces:
                    continue
            log.info("removing the cgroup mirror a killed daemon left: %s", name)
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC,
                         dir_fd=self.parent_fd)
            try:
                self._teardown(fd, name)
            finally:
                os.close(fd)
            try:
                os.rmdir(name, dir_fd=self.parent_fd)
            except OSError as e:
                log.warning("cannot remove %s: %s", name, e)

    def _teardown(self, top: int, what: str) -> None:
        """Thaw the subtree under `top`, move its processes to the parent of `top`,
        and remove every cgroup below `top`, deepest first."""
        with contextlib.suppress(OSError):
            _write_at(top, "cgroup.freeze", "0")  # thaws the whole subtree
        dirs = [d for d, _, _, _ in os.fwalk(".", dir_fd=top)]
        for d in reversed(dirs):
            for _ in range(TEARDOWN_ROUNDS):
                try:
                    pids = _read_at(top, f"{d}/cgroup.procs").split()
                except OSError:
                    break
                if not pids:
                    break
                for pid in pids:
                    with contextlib.suppress(OSError):  # exited meanwhile
                        _write_at(self.parent_fd, "cgroup.procs", pid)
                time.sleep(TEARDOWN_PAUSE)
            if d != ".":
                try:
                    os.rmdir(d, dir_fd=top)
                except OSError as e:
                    log.warning("cannot remove %s/%s: %s", what, d, e)

    def _read(self, path: str, name: str) -> str:
        return _read_at(self.fd, f"{_rel(path)}/{name}")

    def _write(self, path: str, name: str, text: str) -> None:
        _write_at(self.fd, f"{_rel(path)}/{name}", text)


def _pid_namespaces() -> set[int]:
    """The inodes of every pid namespace some process visible here is in."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                found.add(os.stat(f"/proc/{entry}/ns/pid").st_ino)
    return found


def _rel(path: str) -> str:
    return path.strip("/") or "."


def _read_at(dir_fd: int, name: str) -> str:
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks).decode()
    finally:
        os.close(fd)


def _write_at(dir_fd: int, name: str, text: str) -> None:
    fd = os.open(name, os.O_WRONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
