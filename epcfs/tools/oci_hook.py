"""`epcfs oci-hook [--mountpoint M] [STAGE]`: give an OCI container its own epcfs cgroup.

An OCI runtime (crun, runc) runs this program with the container's state (JSON) on
stdin, from a CDI spec (`epcfs cdi`) or from an OCI hooks.d file (hooks.d/epcfs.json).

- At createRuntime (or prestart; both run in the runtime's namespaces once the
  container's mounts are made, before pivot_root): make `containers/<id>` under the epcfs
  mount M, write the annotations `epcfs.io/misc.max` and `epcfs.io/memory.max` to the
  files of those names exactly as given, move the container's init in, and mount that
  cgroup over the container's /sys/fs/cgroup, so the container sees its cgroup as the
  root, as a private cgroup namespace would show it. Read-only unless the container's
  own /sys/fs/cgroup mount is read-write (podman --privileged). A value the file
  refuses fails the start with the kernel's errno and leaves no cgroup behind.
- At poststop: kill whatever is left in the cgroup (cgroup.kill) and remove it.

STAGE defaults to what the state's status implies (creating/created: set up; stopped:
tear down), so one hooks.d entry can serve both stages.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import json
import os
import sys
import time

from ..host.mountns import (
    AT_FDCWD,
    CGROUP_ROOT,
    CLONE_NEWNS,
    MOVE_MOUNT_F_EMPTY_PATH,
    OPEN_TREE_CLONE,
    SYS_MOVE_MOUNT,
    SYS_OPEN_TREE,
    check_syscall,
    libc,
)

DEFAULT_MOUNTPOINT = "/run/epcfs/cgroup"
"""Where systemd/epcfs.service mounts the daemon."""

PARENT = "containers"
"""The cgroup under the mount that holds one child per container, as podman's
machine.slice or libpod_parent does on a real host."""

ANNOTATIONS = ("misc.max", "memory.max")
"""Interface files a container may set through the annotation `epcfs.io/<file>`."""

ANNOTATION_PREFIX = "epcfs.io/"
"""The domain-named prefix OCI asks annotation keys to carry; the CDI kind's vendor."""

CONTROLLERS = "+misc +memory"
"""What the mount's root and PARENT enable for their children, so each container's
cgroup has misc.max and memory.max of its own."""

STAGES = ("createRuntime", "prestart", "poststop")
"""The OCI hook stages this program serves: createRuntime and the older prestart run at
the same point (mounts made, before pivot_root, in the runtime's namespaces)."""

REMOVE_TIMEOUT = 10.0
"""Seconds poststop waits for killed members to leave (rmdir's EBUSY) on a loaded host."""

# Kernel ABI for the parts host/mountns.py does not define: mounting into another
# process's mount namespace by file descriptor (move_mount with both paths empty) and
# making the new mount read-only before it is attached (mount_setattr).
SYS_MOUNT_SETATTR = 442
MOVE_MOUNT_T_EMPTY_PATH = 0x40
AT_EMPTY_PATH = 0x1000
MOUNT_ATTR_RDONLY = 0x1



class HookError(Exception):
    """The container must not start; the message says why (with the errno's text).

    The hook exits with the errno as its status: crun reports only a hook's status
    ("exit code: 22"), runc also its stderr."""

    def __init__(self, message: str, err: int = 0) -> None:
        super().__init__(message)
        self.errno = err


class MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mountpoint", default=DEFAULT_MOUNTPOINT, metavar="M",
                   help=f"where the epcfs daemon is mounted (default {DEFAULT_MOUNTPOINT})")
    p.add_argument("stage", nargs="?", choices=STAGES, default=None,
                   help="the OCI hook stage (default: from the state's status)")


def run(args: argparse.Namespace) -> int:
    try:
        state = json.load(sys.stdin)
        cid = state["id"]
    except (ValueError, KeyError, TypeError) as e:
        print(f"epcfs oci-hook: no OCI state on stdin: {e}", file=sys.stderr)
        return 1
    if not isinstance(cid, str) or cid in ("", ".", "..") or "/" in cid:
        print(f"epcfs oci-hook: container id {cid!r} cannot name a cgroup", file=sys.stderr)
        return 1
    stage = args.stage or ("poststop" if state.get("status") == "stopped" else "createRuntime")
    mountpoint = os.path.abspath(args.mountpoint)
    cgroup = os.path.join(mountpoint, PARENT, cid)
    try:
        if stage == "poststop":
            remove(cgroup)
        else:
            create(mountpoint, cgroup, state)
    except HookError as e:
        print(f"epcfs oci-hook: {cid[:12]}: {e}", file=sys.stderr)
        return e.errno or 1
    return 0


def create(mountpoint: str, cgroup: str, state: dict) -> None:
    """Make the container's cgroup, set its limits, move its init in and show it as the
    container's /sys/fs/cgroup. On any failure nothing is left behind."""
    pid = state.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        raise HookError(f"no container pid in the state (status {state.get('status')!r})")
    limits = _limits(state.get("annotations"))
    bundle = state.get("bundle")
    if not isinstance(bundle, str):
        raise HookError("no bundle in the state")
    rootfs, readonly = _container_root(bundle)
    parent = os.path.dirname(cgroup)
    _write(os.path.join(mountpoint, "cgroup.subtree_control"), CONTROLLERS)
    try:
        os.mkdir(parent)
    except FileExistsError:
        pass
    except OSError as e:
        raise HookError(f"mkdir {parent}: {e.strerror}", e.errno) from e
    _write(os.path.join(parent, "cgroup.subtree_control"), CONTROLLERS)
    try:
        os.mkdir(cgroup)
    except OSError as e:
        raise HookError(f"mkdir {cgroup}: {e.strerror}", e.errno) from e
    moved = False
    try:
        for name, value in limits.items():
            _write(os.path.join(cgroup, name), value)
        _write(os.path.join(cgroup, "cgroup.procs"), str(pid))
        moved = True
        _bind_into(cgroup, pid, rootfs + CGROUP_ROOT, readonly)
    except HookError:
        with contextlib.suppress(OSError, HookError):
            if moved:
                # back to the root, so that the rmdir finds the cgroup empty
                _write(os.path.join(mountpoint, "cgroup.procs"), str(pid))
            os.rmdir(cgroup)
        raise


def _limits(annotations: object) -> dict[str, str]:
    """The files to write and their values, from the state's annotations."""
    if annotations is None:
        return {}
    if not isinstance(annotations, dict):
        raise HookError("the state's annotations are not an object")
    limits = {}
    for name in ANNOTATIONS:
        value = annotations.get(ANNOTATION_PREFIX + name)
        if value is not None and not isinstance(value, str):
            raise HookError(f"annotation {ANNOTATION_PREFIX + name} is not a string")
        if value is not None:
            limits[name] = value
    return limits


def remove(cgroup: str) -> None:
    """Kill what is left in the container's cgroup and remove it; a cgroup already gone
    (a start that failed, a second poststop) is fine."""
    if not os.path.isdir(cgroup):
        return
    with contextlib.suppress(HookError):
        _write(os.path.join(cgroup, "cgroup.kill"), "1")
    deadline = time.monotonic() + REMOVE_TIMEOUT
    while True:
        try:
            os.rmdir(cgroup)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                raise HookError(f"rmdir {cgroup}: {e.strerror}", e.errno) from e
        time.sleep(0.05)


def _container_root(bundle: str) -> tuple[str, bool]:
    """The rootfs path from the bundle's config.json (as the runtime's mount namespace
    sees it before pivot_root), and whether the container's /sys/fs/cgroup is read-only."""
    try:
        with open(os.path.join(bundle, "config.json")) as f:
            config = json.load(f)
        root = config["root"]["path"]
        mounts = config.get("mounts") or []
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise HookError(f"cannot read the bundle's config.json: {e}") from e
    if not isinstance(root, str) or not isinstance(mounts, list):
        raise HookError("the bundle's config.json has no root path or a bad mounts list")
    readonly = True
    for m in mounts:
        if isinstance(m, dict) and str(m.get("destination", "")).rstrip("/") == CGROUP_ROOT:
            readonly = "ro" in (m.get("options") or ())
    return os.path.join(bundle, root), readonly


def _write(path: str, text: str) -> None:
    """One write() of `text`, as `echo TEXT > PATH` does; the kernel's errno on failure."""
    try:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, text.encode() + b"\n")
        finally:
            os.close(fd)
    except OSError as e:
        raise HookError(f"{os.path.basename(path)}: {text!r}: {e.strerror}", e.errno) from e


def _bind_into(source: str, pid: int, target: str, readonly: bool) -> None:
    """Mount the directory `source` (in our mount namespace) at `target` (a path in the
    mount namespace of process `pid`, resolved from that process's root).

    The clone of `source` is taken here, the target is opened through /proc/PID/root,
    and a child that joined the container's mount namespace attaches one to the other
    (move_mount attaches only in the caller's own namespace; setns would change ours).
    """
    tree = check_syscall(libc.syscall(SYS_OPEN_TREE, AT_FDCWD, os.fsencode(source),
                                OPEN_TREE_CLONE | os.O_CLOEXEC), f"open_tree({source})")
    fds = [tree]
    try:
        if readonly:
            attr = MountAttr(attr_set=MOUNT_ATTR_RDONLY)
            check_syscall(libc.syscall(SYS_MOUNT_SETATTR, tree, b"", AT_EMPTY_PATH,
                                 ctypes.byref(attr), ctypes.sizeof(attr)), "mount_setattr")
        fds.append(os.open(f"/proc/{pid}/root/{target.lstrip('/')}",
                           os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
        fds.append(os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC))
    except OSError as e:
        for fd in fds:
            os.close(fd)
        raise HookError(f"mount on the container's /sys/fs/cgroup: {e.strerror}",
                        e.errno) from e
    _, target_fd, ns_fd = fds
    child = os.fork()
    if child == 0:  # pragma: no cover (runs in the forked child)
        try:
            check_syscall(libc.setns(ns_fd, CLONE_NEWNS), "setns")
            check_syscall(libc.syscall(SYS_MOVE_MOUNT, tree, b"", target_fd, b"",
                                 MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH),
                   "move_mount")
        except OSError as e:
            os._exit(e.errno or 1)
        os._exit(0)
    for fd in fds:
        os.close(fd)
    _, status = os.waitpid(child, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise HookError("mount on the container's /sys/fs/cgroup: "
                        + (os.strerror(code) if code > 0 else f"signal {-code}"), max(code, 0))
