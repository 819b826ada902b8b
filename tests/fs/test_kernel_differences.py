"""Kernel answers found by a differential run against this machine's cgroup2 (see
test_differential.py, which compares them directly where a writable cgroup2 exists),
held here through a real mount on every machine, against the kernel source."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from .util import errno_of, read, write


@pytest.mark.parametrize("junk", ["\x1c", "\x1d", "\x1e", "\x1f", "\x85", "\x0b+"])
def test_subtree_control_trims_only_the_kernels_isspace(cg, junk):
    """strstrip() uses lib/ctype.c's isspace: \\t\\n\\v\\f\\r, space and 0xA0. Python's
    str.strip() also strips \\x1c-\\x1f and \\x85, which the kernel leaves in the token."""
    assert write(cg / "cgroup.subtree_control", f"+misc{junk}") == errno.EINVAL
    assert read(cg / "cgroup.subtree_control") == ""


@pytest.mark.parametrize("space", [" ", "\t", "\n", "\v", "\f", "\r", "\xa0"])
def test_subtree_control_trims_the_kernels_isspace(cg, space):
    assert write(cg / "cgroup.subtree_control", f"{space}+misc{space}") == 0
    assert read(cg / "cgroup.subtree_control") == "misc\n"
    assert write(cg / "cgroup.subtree_control", "-misc") == 0


def test_mknod_of_a_regular_file_is_eacces_others_eperm(cg):
    """vfs_create without ->create is EACCES; vfs_mknod without ->mknod is EPERM."""
    assert errno_of(os.mknod, cg / "reg", stat.S_IFREG | 0o644) == errno.EACCES
    assert errno_of(os.mknod, cg / "fifo", stat.S_IFIFO | 0o644) == errno.EPERM
    assert not (cg / "reg").exists() and not (cg / "fifo").exists()


def test_enabling_a_controller_over_a_grandchild_named_like_its_file_is_eexist(cg):
    """cgroup_apply_control -> css_populate_dir -> kernfs_add_one: EEXIST, and
    cgroup_restore_control leaves subtree_control as it was."""
    (cg / "a" / "misc.max").mkdir(parents=True)
    try:
        assert write(cg / "cgroup.subtree_control", "+misc") == errno.EEXIST
        assert read(cg / "cgroup.subtree_control") == ""
        names = os.listdir(cg / "a")
        assert names.count("misc.max") == 1
        # Another controller's files do not clash.
        assert write(cg / "cgroup.subtree_control", "+memory") == 0
    finally:
        (cg / "a" / "misc.max").rmdir()


def test_a_root_only_file_name_does_not_clash(cg):
    """misc.capacity exists only at the root: a child cgroup so named is no obstacle."""
    (cg / "a" / "misc.capacity").mkdir(parents=True)
    try:
        assert write(cg / "cgroup.subtree_control", "+misc") == 0
        assert (cg / "a" / "misc.max").is_file()
        assert write(cg / "cgroup.subtree_control", "-misc") == 0
    finally:
        (cg / "a" / "misc.capacity").rmdir()


def test_seeking_far_past_the_contents_reads_nothing(cg: Path):
    """Known difference: kernfs refuses offsets past 2^31-1 (s_maxbytes MAX_NON_LFS,
    EINVAL); FUSE seeks in the kernel with its own limit and never asks the daemon, so
    epcfs cannot. Reading there is end of file, as any offset past the contents."""
    fd = os.open(cg / "cgroup.procs", os.O_RDONLY)
    try:
        assert os.lseek(fd, 2**31, os.SEEK_SET) == 2**31
        assert os.read(fd, 100) == b""
        assert errno_of(os.lseek, fd, 0, os.SEEK_DATA) in (errno.ENXIO, 0)
    finally:
        os.close(fd)
