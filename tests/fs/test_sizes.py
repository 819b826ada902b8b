"""Interface-file sizes, and readers that copy with splice or sendfile (busybox cat).

cgroupfs reports size 0 and its readers read to EOF. FUSE on some kernels (commit
2cb1e08985e3 without "fuse: use copy_splice_read() for FOPEN_DIRECT_IO") serves splice
of direct-I/O files from the page cache, which stops at the reported size, so those
readers would get nothing. `--file-size auto` (the default) reports sizes only there;
these tests hold on either kind of kernel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from epcfs.service.daemon import splice_stops_at_size

from .util import read, sh, sleeper

PAGE = 4096
needs_busybox = pytest.mark.skipif(not shutil.which("busybox"), reason="busybox not installed")


def sendfile_read(path: Path) -> str:
    """Read the way busybox cat does: sendfile(2) until it returns 0."""
    fd = os.open(path, os.O_RDONLY)
    r, w = os.pipe()
    chunks = []
    try:
        while n := os.sendfile(w, fd, None, 65536):
            chunks.append(os.read(r, n))
    finally:
        for f in (fd, r, w):
            os.close(f)
    return b"".join(chunks).decode()


def busybox_cat(path: Path) -> str:
    return subprocess.run(["busybox", "cat", str(path)], capture_output=True, text=True,
                          check=True, timeout=30).stdout


def test_sendfile_reads_what_read_reads(cg: Path):
    (cg / "misc.max").write_text("sgx_epc 1048576\n")
    proc = sleeper()
    try:
        (cg / "cgroup.procs").write_text(f"{proc.pid}\n")
        for name in ("cgroup.procs", "cgroup.stat", "cgroup.controllers", "misc.max",
                     "misc.current", "misc.events", "memory.current", "memory.events"):
            assert sendfile_read(cg / name) == read(cg / name), name
    finally:
        proc.kill()
        proc.wait()


@needs_busybox
def test_busybox_cat_sees_a_growing_file_whole(cg: Path):
    """Each open sees the contents of its time, however they grew since the last one."""
    sleepers = []
    try:
        for n in range(1, 6):
            sleepers.append(sleeper())
            (cg / "cgroup.procs").write_text(f"{sleepers[-1].pid}\n")
            listed = busybox_cat(cg / "cgroup.procs").split()
            assert sorted(map(int, listed)) == sorted(p.pid for p in sleepers)
            assert len(listed) == n
    finally:
        for p in sleepers:
            p.kill()
            p.wait()


@needs_busybox
def test_busybox_cat_of_the_capacity(cgroupfs: Path):
    assert busybox_cat(cgroupfs / "misc.capacity") == f"sgx_epc {128 << 20}\n"


def test_zero_reports_cgroupfs_sizes(mount_epcfs):
    root = mount_epcfs("--file-size", "zero").path
    sizes = {p.name: p.stat().st_size for p in root.iterdir() if p.is_file()}
    assert sizes and set(sizes.values()) == {0}


def test_content_sizes_end_a_page_past_the_contents(mount_epcfs):
    """Readable files: a page multiple beyond their contents (never less, or a splice
    would cut them); write-only ones 0. Size-trusting readers (tail) still work."""
    root = mount_epcfs("--file-size", "content").path
    (root / "a").mkdir()
    for path in [*root.iterdir(), *(root / "a").iterdir()]:
        if not path.is_file():
            continue
        size = path.stat().st_size
        if path.stat().st_mode & 0o444:
            text = read(path)
            assert size % PAGE == 0 and size > len(text.encode()), path.name
            if path.parent == root and path.name in ("cgroup.procs", "cgroup.threads"):
                continue  # the root's members include the readers themselves
            assert sendfile_read(path) == text, path.name
            tail = sh(f"tail -n 1 {path}").out
            assert tail == (text.splitlines(keepends=True) or [""])[-1], path.name
        else:
            assert size == 0, path.name
    (root / "a").rmdir()


@needs_busybox
def test_the_probe_sees_what_busybox_sees(mount_epcfs):
    """`auto`'s probe on a zero-size mount says yes exactly when busybox cat gets nothing,
    and `auto` then reports sizes, so busybox cat works."""
    zero = mount_epcfs("--file-size", "zero").path / "misc.capacity"
    broken = busybox_cat(zero) == ""
    assert splice_stops_at_size(str(zero)) == broken
    auto = mount_epcfs().path / "misc.capacity"
    assert (auto.stat().st_size > 0) == broken
    assert busybox_cat(auto) == read(auto)


@needs_busybox
def test_busybox_cat_in_the_v1_layout(mount_epcfs):
    root = mount_epcfs("--cgroup-version", "1").path
    for path in (root / "misc" / "misc.capacity", root / "memory" / "memory.usage_in_bytes",
                 root / "memory" / "memory.limit_in_bytes"):
        assert busybox_cat(path) == read(path) != ""
