"""The tree itself: which files exist where, modes and owners, mkdir/rmdir and
subtree_control rules, names that cannot be made, statfs, chmod/chown, delegation."""

from __future__ import annotations

import errno
import os
import stat
import subprocess

import pytest

from .util import bash, errno_of, read, sh, sleeper, wait_for, write

CORE = {"cgroup.controllers", "cgroup.max.depth", "cgroup.max.descendants", "cgroup.procs",
        "cgroup.stat", "cgroup.subtree_control", "cgroup.threads"}
CORE_NONROOT = CORE | {"cgroup.events", "cgroup.type", "cgroup.freeze", "cgroup.kill"}
MISC_NONROOT = {"misc.max", "misc.current", "misc.events", "misc.events.local", "misc.peak"}
MEMORY_NONROOT = {"memory.max", "memory.current", "memory.peak", "memory.events",
                  "memory.events.local", "memory.swap.max"}
READ_ONLY = {"cgroup.controllers", "cgroup.events", "cgroup.stat", "misc.capacity",
             "misc.current", "misc.peak", "misc.events", "misc.events.local",
             "memory.current", "memory.events", "memory.events.local"}


def mode_of(path) -> str:
    return stat.filemode(os.stat(path).st_mode)


def test_root_files_modes_and_contents(cgroupfs, mount_epcfs):
    root = cgroupfs
    assert set(os.listdir(root)) == CORE | {"misc.capacity", "misc.current", "misc.peak"}
    assert mode_of(root) == "dr-xr-xr-x"
    for name in os.listdir(root):
        st = os.stat(root / name)
        expected = "-r--r--r--" if name in READ_ONLY else "-rw-r--r--"
        # sizes: tests/fs/test_sizes.py
        assert (stat.filemode(st.st_mode), st.st_uid, st.st_gid) == (expected, 0, 0), name
    assert read(root / "cgroup.controllers") == "memory misc\n"
    # as a booted host's init system leaves it (--root-controllers), or bare
    assert read(root / "cgroup.subtree_control") == "memory misc\n"
    bare = mount_epcfs("--root-controllers", "").path
    assert read(bare / "cgroup.subtree_control") == ""
    assert read(root / "misc.capacity") == "sgx_epc 134217728\n"
    assert read(root / "misc.current") == "sgx_epc 0\n"
    assert read(root / "misc.peak") == "sgx_epc 0\n"
    assert read(root / "cgroup.max.depth") == "max\n"
    assert read(root / "cgroup.stat") == (
        "nr_descendants 0\nnr_subsys_memory 1\nnr_subsys_misc 1\n"
        "nr_dying_descendants 0\nnr_dying_subsys_memory 0\nnr_dying_subsys_misc 0\n")
    assert str(os.getpid()) in read(root / "cgroup.procs").split()
    assert "1" in read(root / "cgroup.procs").split()


def test_listing_is_in_kernfs_order(cgroupfs):
    """os.listdir order is the kernel's (kernfs name-hash order), not alphabetical."""
    names = os.listdir(cgroupfs)
    assert names != sorted(names)
    real = "/sys/fs/cgroup/unified"
    if os.path.isdir(real):
        common = set(names) & set(os.listdir(real))
        assert len(common) >= 6
        assert [n for n in names if n in common] == [n for n in os.listdir(real) if n in common]
    assert sh("ls -a | head -2", cwd=cgroupfs).out == ".\n..\n"


def test_nonroot_files_follow_parent_subtree_control(mount_epcfs):
    root = mount_epcfs("--root-controllers", "").path
    (root / "a").mkdir()
    assert mode_of(root / "a") == "drwxr-xr-x"
    assert set(os.listdir(root / "a")) == CORE_NONROOT
    assert mode_of(root / "a" / "cgroup.kill") == "--w-------"
    for name in ("cgroup.events", "cgroup.controllers", "cgroup.stat"):
        assert mode_of(root / "a" / name) == "-r--r--r--"
    assert read(root / "a" / "cgroup.events") == "populated 0\nfrozen 0\n"
    assert read(root / "a" / "cgroup.type") == "domain\n"
    assert read(root / "a" / "cgroup.controllers") == ""

    # enabling shows the files at once, in existing and new children
    assert sh("echo +misc > cgroup.subtree_control && ls a/misc.max", cwd=root).ok
    (root / "b").mkdir()
    for cg in ("a", "b"):
        assert set(os.listdir(root / cg)) == CORE_NONROOT | MISC_NONROOT
        assert read(root / cg / "cgroup.controllers") == "misc\n"
    assert read(root / "a" / "misc.max") == "sgx_epc max\n"
    assert read(root / "a" / "misc.current") == "sgx_epc 0\n"
    assert read(root / "a" / "misc.events") == "sgx_epc.max 0\n"
    assert read(root / "a" / "misc.events.local") == "sgx_epc.max 0\n"
    assert read(root / "a" / "misc.peak") == "sgx_epc 0\n"

    # stat of a cached name right after the disabling write: gone at once
    r = sh("stat a/misc.max >/dev/null && echo -misc > cgroup.subtree_control && "
           "! stat a/misc.max 2>/dev/null && ! cat a/misc.max 2>/dev/null", cwd=root)
    assert r.ok, r
    assert set(os.listdir(root / "a")) == CORE_NONROOT

    assert sh("echo '+memory +misc' > cgroup.subtree_control", cwd=root).ok
    assert set(os.listdir(root / "a")) == CORE_NONROOT | MISC_NONROOT | MEMORY_NONROOT
    assert read(root / "a" / "cgroup.controllers") == "memory misc\n"
    assert read(root / "a" / "memory.max") == "max\n"
    assert read(root / "a" / "memory.events") == (
        "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n")
    for name in MISC_NONROOT | MEMORY_NONROOT:
        expected = "-r--r--r--" if name in READ_ONLY else "-rw-r--r--"
        assert mode_of(root / "a" / name) == expected, name


def test_open_fd_on_removed_file_is_enodev(cgroupfs):
    root = cgroupfs
    write(root / "cgroup.subtree_control", "+misc")
    (root / "a").mkdir()
    fd = os.open(root / "a" / "misc.max", os.O_RDWR)
    try:
        assert write(root / "cgroup.subtree_control", "-misc") == 0
        assert errno_of(os.pread, fd, 100, 0) == errno.ENODEV
        assert errno_of(os.write, fd, b"sgx_epc 5") == errno.ENODEV
    finally:
        os.close(fd)


def test_mkdir_rmdir_rules(cg):
    assert errno_of(os.mkdir, cg / "a\nb") == errno.EINVAL
    os.mkdir(cg / "a")
    assert errno_of(os.mkdir, cg / "a") == errno.EEXIST
    os.mkdir(cg / "a" / "b")
    assert errno_of(os.rmdir, cg / "a") == errno.EBUSY  # has a child
    assert errno_of(os.rmdir, cg / "a" / "cgroup.procs") == errno.ENOTDIR
    os.rmdir(cg / "a" / "b")
    os.rmdir(cg / "a")
    assert errno_of(os.rmdir, cg / "a") == errno.ENOENT
    long_name = "n" * 255
    os.mkdir(cg / long_name)
    os.rmdir(cg / long_name)
    os.mkdir(cg / "m", 0o700)
    assert mode_of(cg / "m") == "drwx------"


def test_rmdir_populated_is_ebusy(cg):
    p = sleeper()
    try:
        write(cg / "cgroup.procs", str(p.pid))
        assert read(cg / "cgroup.events") == "populated 1\nfrozen 0\n"
        r = sh(f"rmdir {cg}")
        assert r.rc == 1 and "Device or resource busy" in r.err
        os.mkdir(cg / "c")
        write(cg / "c" / "cgroup.procs", str(p.pid))
        assert errno_of(os.rmdir, cg / "c") == errno.EBUSY
        assert errno_of(os.rmdir, cg) == errno.EBUSY
    finally:
        p.kill()
        p.wait()
    wait_for(lambda: read(cg / "cgroup.events").startswith("populated 0"))
    os.rmdir(cg / "c")


def test_max_depth_and_descendants_are_eagain(cg):
    write(cg / "cgroup.max.depth", "1")
    os.mkdir(cg / "a")
    r = sh("mkdir a/b", cwd=cg)
    assert r.rc == 1 and "Resource temporarily unavailable" in r.err
    write(cg / "cgroup.max.depth", "max")
    os.mkdir(cg / "a" / "b")
    write(cg / "cgroup.max.descendants", "2")
    assert errno_of(os.mkdir, cg / "c") == errno.EAGAIN
    write(cg / "a" / "cgroup.max.descendants", "0")
    write(cg / "cgroup.max.descendants", "max")
    assert errno_of(os.mkdir, cg / "a" / "d") == errno.EAGAIN
    os.mkdir(cg / "c")
    assert read(cg / "cgroup.stat").splitlines()[0] == "nr_descendants 3"


def test_subtree_control_rules(cg):
    os.mkdir(cg / "a")
    # the parent enables memory and misc for cg: cg may enable them for a
    assert write(cg / "a" / "cgroup.subtree_control", "+misc") == errno.ENOENT
    assert write(cg / "cgroup.subtree_control", "+misc") == 0
    assert write(cg / "a" / "cgroup.subtree_control", "+memory") == errno.ENOENT
    assert write(cg / "a" / "cgroup.subtree_control", "-memory") == 0  # not on: ignored
    assert write(cg / "a" / "cgroup.subtree_control", "+misc") == 0
    assert write(cg / "cgroup.subtree_control", "-misc") == errno.EBUSY  # a enables it
    assert read(cg / "cgroup.subtree_control") == "misc\n"
    r = bash("echo -misc > cgroup.subtree_control", cwd=cg)
    assert "write error: Device or resource busy" in r.err
    assert write(cg / "a" / "cgroup.subtree_control", "-misc") == 0
    # the no-internal-process rule
    p = sleeper()
    try:
        os.mkdir(cg / "a" / "leaf")
        assert write(cg / "a" / "leaf" / "cgroup.procs", str(p.pid)) == 0
        assert write(cg / "a" / "leaf" / "cgroup.subtree_control", "+misc") == errno.ENOENT
        assert write(cg / "a" / "cgroup.subtree_control", "+misc") == 0
        assert write(cg / "a" / "leaf" / "cgroup.subtree_control", "+misc") == errno.EBUSY
        assert write(cg / "a" / "leaf" / "cgroup.subtree_control", "-misc") == 0
        os.mkdir(cg / "a" / "other")
        # a enables misc: no process may join it
        assert write(cg / "a" / "cgroup.procs", str(p.pid)) == errno.EBUSY
        assert write(cg / "a" / "other" / "cgroup.procs", str(p.pid)) == 0
    finally:
        p.kill()
        p.wait()
    wait_for(lambda: read(cg / "a" / "cgroup.events").startswith("populated 0"))
    assert write(cg / "a" / "other" / "cgroup.subtree_control", "+misc") == 0
    stat_lines = read(cg / "cgroup.stat").splitlines()
    assert stat_lines[:3] == ["nr_descendants 3", "nr_subsys_memory 1", "nr_subsys_misc 4"]


def test_names_that_cannot_be_made(cg):
    assert "Permission denied" in sh("touch new", cwd=cg).err
    assert errno_of(os.open, cg / "new", os.O_CREAT | os.O_WRONLY) == errno.EACCES
    assert errno_of(os.mkfifo, cg / "fifo") == errno.EPERM
    # mknod of a regular file (os.mknod's default) is vfs_create: EACCES on kernfs.
    assert errno_of(os.mknod, cg / "node") == errno.EACCES
    assert errno_of(os.symlink, "x", cg / "link") == errno.EPERM
    assert errno_of(os.link, cg / "cgroup.procs", cg / "hard") == errno.EPERM
    assert errno_of(os.unlink, cg / "cgroup.procs") == errno.EPERM
    assert "Operation not permitted" in sh("rm -f cgroup.procs", cwd=cg).err
    assert errno_of(os.rename, cg / "cgroup.procs", cg / "p") == errno.EPERM
    os.mkdir(cg / "d")
    assert errno_of(os.rename, cg / "d", cg / "e") == errno.EPERM
    assert errno_of(os.unlink, cg / "d") == errno.EISDIR
    assert errno_of(os.rmdir, cg / "nosuch") == errno.ENOENT


def test_root_read_only_and_write_only(cg):
    """Root bypasses the modes (default_permissions) and gets the kernel's EINVAL."""
    fd = os.open(cg / "cgroup.controllers", os.O_WRONLY)
    try:
        assert errno_of(os.write, fd, b"+misc") == errno.EINVAL
    finally:
        os.close(fd)
    r = sh("cat cgroup.kill", cwd=cg)
    assert r.rc == 1 and "Invalid argument" in r.err
    size = os.stat(cg / "cgroup.max.depth").st_size
    assert sh("truncate -s 0 cgroup.procs && truncate -s 10 cgroup.max.depth", cwd=cg).ok
    assert os.stat(cg / "cgroup.max.depth").st_size == size
    assert read(cg / "cgroup.max.depth") == "max\n"


def test_statfs(cgroupfs):
    st = os.statvfs(cgroupfs)
    assert (st.f_bsize, st.f_frsize, st.f_blocks, st.f_files, st.f_namemax) == (
        4096, 4096, 0, 0, 255)
    r = sh(f"stat -f -c '%s %b %l' {cgroupfs}")
    assert r.ok and r.out == "4096 0 255\n"


def test_chmod_chown_and_times(cg):
    assert sh("chmod 600 cgroup.procs && chown 65534:65534 cgroup.procs . && "
              "touch -d 2020-01-01 cgroup.procs", cwd=cg).ok
    st = os.stat(cg / "cgroup.procs")
    assert (stat.filemode(st.st_mode), st.st_uid, st.st_gid) == ("-rw-------", 65534, 65534)
    assert st.st_mtime == 1577836800
    assert os.stat(cg).st_uid == 65534
    os.chmod(cg / "cgroup.procs", 0o4777)
    assert stat.S_IMODE(os.stat(cg / "cgroup.procs").st_mode) == 0o4777


NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def _as_nobody(command: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([*NOBODY, "bash", "-c", command], cwd=cwd, capture_output=True,
                          text=True)


def test_delegation_to_an_unprivileged_user(cg):
    """A subtree chowned to a user (as cgcreate -a/-t does): the user makes cgroups in
    it, owns them, and moves its processes between them; a move needs write access to
    the common ancestor's cgroup.procs (else EACCES), and the file's own mode rules."""
    os.chown(cg, 65534, 65534)
    for name in ("cgroup.procs", "cgroup.subtree_control"):
        os.chown(cg / name, 65534, 65534)
    r = _as_nobody("mkdir a b", cg)
    assert r.returncode == 0, r.stderr
    assert os.stat(cg / "a").st_uid == 65534
    st = os.stat(cg / "a" / "cgroup.procs")
    assert (st.st_uid, st.st_gid) == (65534, 65534)
    p = subprocess.Popen([*NOBODY, "sleep", "30"])
    outside = cg.parent / f"{cg.name}-x"
    try:
        # from the root into the subtree: the root's cgroup.procs is root's
        r = _as_nobody(f"echo {p.pid} > a/cgroup.procs", cg)
        assert r.returncode == 1 and "Permission denied" in r.stderr
        assert write(cg / "a" / "cgroup.procs", str(p.pid)) == 0
        r = _as_nobody(f"echo {p.pid} > b/cgroup.procs", cg)  # common ancestor: cg
        assert r.returncode == 0, r.stderr
        assert read(cg / "b" / "cgroup.procs") == f"{p.pid}\n"
        os.mkdir(outside)
        os.chown(outside / "cgroup.procs", 65534, 65534)
        r = _as_nobody(f"echo {p.pid} > ../{outside.name}/cgroup.procs", cg)
        assert r.returncode == 1 and "Permission denied" in r.stderr
        os.chown(cg / "a" / "cgroup.procs", 0, 0)
        r = _as_nobody(f"echo {p.pid} > a/cgroup.procs", cg)
        assert r.returncode == 1 and "Permission denied" in r.stderr
        assert read(cg / "b" / "cgroup.procs") == f"{p.pid}\n"
    finally:
        p.kill()
        p.wait()
        wait_for(lambda: read(cg / "b" / "cgroup.procs") == "")
        if outside.exists():
            os.rmdir(outside)


@pytest.mark.parametrize("args, capacity", [
    (("--capacity", "64M"), "sgx_epc 67108864\n"),
    (("--epc-section", "0:32M", "--epc-section", "1:16M"), "sgx_epc 50331648\n"),
])
def test_capacity_options(mount_epcfs, args, capacity):
    assert read(mount_epcfs(*args).path / "misc.capacity") == capacity
