"""Whatever is thrown at it, the daemon answers with an errno and keeps serving, and
no handler fails unexpectedly (the daemon logs those: its log must stay clean)."""

from __future__ import annotations

import errno
import os
import random

from .util import errno_of, read, write

PAYLOADS = [b"", b"\x00", b"\xff\xfe\xfd", b"5\x00junk", b"\n\n\n", b"+", b"-", b" ",
            b"max\x00", b"sgx_epc\x00 5", b"0" * 4096, b"\xa0max\xa0", b"1" * 40,
            "\u00e9".encode(), b"+misc\x00-misc", b"-9223372036854775808"]


def test_junk_everywhere(mount_epcfs):
    daemon = mount_epcfs()
    root = daemon.path
    write(root / "cgroup.subtree_control", "+misc +memory")
    cg = root / "hostile"
    os.mkdir(cg)
    rng = random.Random(4)
    payloads = PAYLOADS + [rng.randbytes(rng.randrange(1, 300)) for _ in range(20)]
    for directory in (root, cg):
        for name in sorted(os.listdir(directory)):
            path = directory / name
            if path.is_dir() or name in ("cgroup.kill", "cgroup.freeze", "cgroup.procs",
                                         "cgroup.threads"):
                continue  # would act on real processes (pid 0 is us, 5 is someone)
            for payload in payloads:
                fd = os.open(path, os.O_RDWR)
                try:
                    try:
                        os.write(fd, payload)
                    except OSError as e:
                        assert e.errno in (errno.EINVAL, errno.ERANGE, errno.ENOENT,
                                           errno.EBUSY, errno.E2BIG, errno.EOPNOTSUPP)
                    os.pread(fd, 4096, 1 << 40)
                    os.pread(fd, 4096, 3)
                finally:
                    os.close(fd)
    write(cg / "cgroup.max.depth", "max")
    assert write(cg / "cgroup.max.depth", "7\x00junk") == 0
    assert read(cg / "cgroup.max.depth") == "7\n"
    for name in (b"\xff\xfe", b"a b", b"\x01", b"-", b"x" * 255):
        os.mkdir(os.fsencode(cg) + b"/" + name)
        assert os.path.isdir(os.fsencode(cg) + b"/" + name)
        os.rmdir(os.fsencode(cg) + b"/" + name)
    long_name = os.fsencode(cg) + b"/" + b"y" * 2000  # kernfs has no NAME_MAX either
    os.mkdir(long_name)
    os.rmdir(long_name)
    assert errno_of(os.open, cg / ("z" * 300), os.O_RDONLY) == errno.ENOENT
    assert read(root / "misc.capacity") == "sgx_epc 134217728\n"
    assert daemon.proc.poll() is None
    log = daemon.log.read_text()
    assert "failed" not in log and "Traceback" not in log, log
