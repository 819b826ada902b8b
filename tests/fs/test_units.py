"""In-process pieces of the fs: the kernel's parsers and the handler guard."""

from __future__ import annotations

import errno
import os
from types import SimpleNamespace

import pyfuse3
import pytest

from epcfs.fs import ops
from epcfs.fs.cftype import CfType, Context, Where
from epcfs.fs.ops import CgroupFs, kernfs_name_hash
from epcfs.fs.parse import kstrtoint, kstrtoull, page_counter_memparse, strstrip
from epcfs.host.events import EventTracker
from epcfs.model.cgroup import Hierarchy
from epcfs.model.constants import PAGE_COUNTER_MAX
from epcfs.model.errors import KernelError


def err(fn, *args) -> int:
    try:
        fn(*args)
    except KernelError as e:
        return e.errno
    return 0


@pytest.mark.parametrize("text, value", [
    ("0", 0), ("+7", 7), ("0x1f", 31), ("0X1F", 31), ("017", 15), ("5\n", 5),
    ("18446744073709551615", (1 << 64) - 1),
])
def test_kstrtoull_accepts(text, value):
    assert kstrtoull(text) == value


@pytest.mark.parametrize("text, code", [
    ("", errno.EINVAL), ("-1", errno.EINVAL), (" 1", errno.EINVAL), ("1 ", errno.EINVAL),
    ("0x", errno.EINVAL), ("08", errno.EINVAL), ("1k", errno.EINVAL), ("++1", errno.EINVAL),
    ("5\n\n", errno.EINVAL), ("18446744073709551616", errno.ERANGE),
])
def test_kstrtoull_refuses(text, code):
    assert err(kstrtoull, text) == code


def test_kstrtoint_range():
    assert kstrtoint("-2147483648") == -(1 << 31)
    assert kstrtoint("2147483647") == (1 << 31) - 1
    assert err(kstrtoint, "2147483648") == errno.ERANGE
    assert err(kstrtoint, "-2147483649") == errno.ERANGE
    assert err(kstrtoint, "-") == errno.EINVAL


def test_memparse_matches_the_kernel():
    """Values checked against a real kernel's memory.limit_in_bytes (same parser)."""
    pages = {"1k": 0, "4097": 1, "0x2000": 2, "010000": 1, "": 0, "k": 0, "8k": 2,
             "1E": 1 << 48, "16E": 0, "1g": 1 << 18,
             "99999999999999999999999": 200376420520685568 // 4096}
    for text, expected in pages.items():
        assert page_counter_memparse(text) == expected, text
    for text in ("1KB", "+5", "-5", "0x", "08", "1x", "max "):
        assert err(page_counter_memparse, text) == errno.EINVAL, text
    assert page_counter_memparse("max") == PAGE_COUNTER_MAX
    assert page_counter_memparse("9223372036854775807") == PAGE_COUNTER_MAX


def test_strstrip_is_the_kernels():
    assert strstrip(" \t\n\v\f\r\xa0x \n") == "x"
    assert strstrip("\x1cx") == "\x1cx"  # not isspace() in the kernel's ctype


def test_kernfs_name_hash():
    assert kernfs_name_hash(b"cgroup.procs") != kernfs_name_hash(b"cgroup.stat")
    assert 2 <= kernfs_name_hash(b"") < 0x7FFFFFFF


@pytest.fixture
def fs(monkeypatch):
    def boom(ctx, cg):
        raise RuntimeError("a bug")

    def refuse(ctx, cg, text, caller):
        raise KernelError(errno.EXDEV, "a refusal")

    extra = (CfType("test.boom", Where.ALL, show=boom, write=refuse),)
    monkeypatch.setattr(ops, "TABLES", (*ops.TABLES, extra))
    h = Hierarchy({"sgx_epc": 1 << 20})
    tracker = EventTracker(h, use_connector=False)
    yield CgroupFs(Context(h, tracker))
    tracker.close()


REQ = SimpleNamespace(pid=os.getpid(), uid=0, gid=0, umask=0o022)


async def test_a_bug_in_a_handler_is_eio_and_the_fs_keeps_serving(fs, caplog):
    entry = await fs.lookup(pyfuse3.ROOT_INODE, b"test.boom", REQ)
    info = await fs.open(entry.st_ino, os.O_RDWR, REQ)
    with pytest.raises(pyfuse3.FUSEError) as e:
        await fs.read(info.fh, 0, 4096)
    assert e.value.errno == errno.EIO
    assert "a bug" in caplog.text
    with pytest.raises(pyfuse3.FUSEError) as e:
        await fs.write(info.fh, 0, b"x")
    assert e.value.errno == errno.EXDEV
    await fs.release(info.fh)
    await fs.release(info.fh)  # a second release of a gone handle is logged, not raised
    entry = await fs.lookup(pyfuse3.ROOT_INODE, b"misc.capacity", REQ)
    info = await fs.open(entry.st_ino, os.O_RDONLY, REQ)
    assert await fs.read(info.fh, 0, 4096) == b"sgx_epc 1048576\n"
