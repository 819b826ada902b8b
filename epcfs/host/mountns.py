"""A private mount namespace in which epcfs is the cgroup2 hierarchy (or, with
--cgroup-version 1, the v1 layout: see CGROUP1_LINES and PROC_CGROUPS_V1).

Three kernel facilities, reached through libc because Python 3.11 has no wrappers:
- unshare(CLONE_NEWNS) plus recursive MS_PRIVATE, so nothing mounted here reaches the
  host (the host's /sys/fs/cgroup is never touched);
- open_tree(OPEN_TREE_CLONE) + move_mount() to mount a regular file over the
  /proc/mounts *symlink itself*: the new mount API does not follow a symlink at the
  target, so the fake table replaces what libcgroup reads without touching
  /proc/self/mounts of any process;
- the mount table written there shows epcfs as `cgroup2`, because libcgroup (cgcreate,
  cgexec, …) accepts only that fstype, and a FUSE mount always shows `fuse.<subtype>`.

What this cannot fool: statfs(2)'s f_type (FUSE's magic, not CGROUP2_SUPER_MAGIC),
/proc/self/mounts and /proc/self/mountinfo (they still say fuse.epcfs), and
/proc/PID/cgroup (the kernel's own answer, from the real hierarchy).
"""

from __future__ import annotations

import ctypes
import os

CLONE_NEWNS = 0x00020000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
OPEN_TREE_CLONE = 1
MOVE_MOUNT_F_EMPTY_PATH = 0x4
AT_FDCWD = -100

CGROUP_ROOT = "/sys/fs/cgroup"
CGROUP2_LINE = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime 0 0\n"
"""How a kernel lists a cgroup2 hierarchy mounted by systemd."""

CGROUP1_LINES = (
    "tmpfs /sys/fs/cgroup tmpfs ro,nosuid,nodev,noexec,mode=755 0 0\n"
    "cgroup /sys/fs/cgroup/misc cgroup rw,nosuid,nodev,noexec,relatime,misc 0 0\n"
    "cgroup /sys/fs/cgroup/memory cgroup rw,nosuid,nodev,noexec,relatime,memory 0 0\n"
)
"""cgroup v1 as a systemd host lists it: a read-only tmpfs holding one mount per
hierarchy, each naming its controller among the options."""

libc = ctypes.CDLL(None, use_errno=True)


def check_syscall(result: int, what: str) -> int:
    """`result` of a libc call, or OSError with its errno when it failed."""
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def enter_private_mount_namespace() -> None:
    """Give this process its own mount namespace whose mounts never propagate out."""
    check_syscall(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    check_syscall(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None),
                  "mount --make-rprivate /")


def mount_file_over(source: str, target: str) -> None:
    """Mount the file `source` at `target`, without following `target` if it is a symlink."""
    fd = check_syscall(
        libc.syscall(SYS_OPEN_TREE, AT_FDCWD, os.fsencode(source),
                      OPEN_TREE_CLONE | os.O_CLOEXEC),
        f"open_tree({source})",
    )
    try:
        check_syscall(
            libc.syscall(SYS_MOVE_MOUNT, fd, b"", AT_FDCWD, os.fsencode(target),
                          MOVE_MOUNT_F_EMPTY_PATH),
            f"move_mount(→{target})",
        )
    finally:
        os.close(fd)


def cgroup2_mount_table(real_table: str, root: str = CGROUP_ROOT, version: int = 2) -> str:
    """The mount table as a kernel with cgroup2 at `root` would list it: every line at or
    under `root` (the FUSE mount and whatever it now hides) replaced by one cgroup2 line
    (version 1: by the tmpfs and the misc and memory cgroup lines)."""
    kept = [
        line + "\n"
        for line in real_table.splitlines()
        if len(line.split()) > 1 and not _at_or_under(line.split()[1], root)
    ]
    lines = CGROUP1_LINES if version == 1 else CGROUP2_LINE
    return "".join(kept) + lines.replace(CGROUP_ROOT, root)


def _at_or_under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


PROC_CGROUPS_V1 = (
    "#subsys_name\thierarchy\tnum_cgroups\tenabled\n"
    "memory\t1\t1\t1\n"
    "misc\t2\t1\t1\n"
)
"""/proc/cgroups of the simulated v1 machine: libcgroup learns the controller names (and
which hierarchy holds each) from it before it matches mount options against them. Only
epcfs's controllers, in the kernel's subsystem order; num_cgroups is not kept current
(libcgroup does not read it)."""


def fake_proc_cgroups(workdir: str) -> None:
    """Show the v1 controllers in /proc/cgroups (in this namespace only)."""
    path = os.path.join(workdir, "cgroups")
    with open(path, "w") as f:
        f.write(PROC_CGROUPS_V1)
    mount_file_over(path, "/proc/cgroups")


def fake_proc_mounts(workdir: str, root: str = CGROUP_ROOT, version: int = 2) -> None:
    """Show epcfs at `root` as cgroup2 (or the v1 layout) in /proc/mounts (in this
    namespace only)."""
    with open("/proc/self/mounts") as f:
        table = cgroup2_mount_table(f.read(), root, version)
    path = os.path.join(workdir, "mounts")
    with open(path, "w") as f:
        f.write(table)
    mount_file_over(path, "/proc/mounts")
