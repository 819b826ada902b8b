"""Fixtures shared by every test that needs a real epcfs mount.

The daemon always runs in a subprocess (never in the test process), and every mount is
torn down whatever the test's outcome: SIGTERM, then a lazy unmount and SIGKILL if the
daemon did not leave by itself. A test that leaves a FUSE mount behind is a bug.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EPCFS = [sys.executable, "-m", "epcfs.cli"]
READY_TIMEOUT = 15.0
"""Seconds a daemon may take to answer on a loaded two-core CI machine."""


class ReadyNotice:
    """A NOTIFY_SOCKET for one daemon, as systemd gives it: `env` carries it; `ready()`
    polls for READY=1. The daemon may still be settling how it serves until then
    (--file-size auto), so tests that race it wait for this, not for a file to exist."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        name = f"epcfs-test-{os.getpid()}-{id(self)}"
        self.sock.bind("\0" + name)
        self.sock.setblocking(False)
        self.env = dict(os.environ if env is None else env, NOTIFY_SOCKET="@" + name)
        self.seen = False

    def ready(self) -> bool:
        with contextlib.suppress(BlockingIOError):
            self.seen = self.seen or b"READY=1" in self.sock.recv(4096)
        return self.seen

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def ready_notice() -> type[ReadyNotice]:
    return ReadyNotice


def is_mounted(path: Path) -> bool:
    target = os.fsencode(os.path.realpath(path))
    with open("/proc/self/mountinfo", "rb") as f:
        return any(line.split()[4] == target for line in f)


class Daemon:
    """One `epcfs mount -f` subprocess and its mountpoint, ready as systemd would see it:
    READY=1 on NOTIFY_SOCKET (the daemon may still be settling how it serves before then,
    e.g. --file-size auto). With an explicit `env`, readiness is misc.capacity existing."""

    def __init__(self, mountpoint: Path, *args: str, env: dict[str, str] | None = None):
        self.path = mountpoint
        self.log = mountpoint.parent / f"{mountpoint.name}.log"
        self._log = open(self.log, "wb")  # noqa: SIM115 (closed in stop())
        notify = ReadyNotice() if env is None else None
        if notify:
            env = notify.env
        self.proc = subprocess.Popen(
            [*EPCFS, "mount", "-f", str(mountpoint), *args],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
        )
        deadline = time.monotonic() + READY_TIMEOUT
        v1 = "--cgroup-version" in args and args[args.index("--cgroup-version") + 1] == "1"
        probe = mountpoint / "misc" / "misc.capacity" if v1 else mountpoint / "misc.capacity"
        try:
            while not (notify.ready() if notify else probe.exists()):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"epcfs did not come up:\n{self.log.read_text()}")
                time.sleep(0.02)
        finally:
            if notify:
                notify.close()

    def stop(self) -> int | None:
        """SIGTERM and wait; anything left is forced away. Returns the exit status."""
        status = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                status = self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        else:
            status = self.proc.returncode
        if is_mounted(self.path):
            subprocess.run(["fusermount3", "-u", "-z", str(self.path)], check=False)
        self._log.close()
        return status


@pytest.fixture
def mount_epcfs(tmp_path: Path) -> Iterator:
    """Factory: `mount_epcfs(*args)` starts a daemon on a fresh directory and returns it."""
    daemons: list[Daemon] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Daemon:
        mp = tmp_path / f"mnt{len(daemons)}"
        mp.mkdir()
        daemon = Daemon(mp, *args, env=env)
        daemons.append(daemon)
        return daemon

    yield start
    for daemon in daemons:
        daemon.stop()
        assert not is_mounted(daemon.path), f"{daemon.path} still mounted"


@pytest.fixture
def cgroupfs(mount_epcfs) -> Path:
    """A mounted epcfs with default options; the path of its root."""
    return mount_epcfs().path


@pytest.fixture(scope="session", params=["auto", "events"])
def shared_epcfs(tmp_path_factory, request) -> Iterator[Daemon]:
    """One daemon for a whole session, for tests that only need cgroups of their own
    under its root (see tests/fs/conftest.py's `cg`), once in each membership mode (auto
    is cgroup wherever it works). Its root enables memory and misc for its children;
    tests must not change root state. Unmounted at session end, when its log must show
    no unexpected handler failure."""
    mp = tmp_path_factory.mktemp("shared") / "mnt"
    mp.mkdir()
    daemon = Daemon(mp, "--membership", request.param)
    try:
        (mp / "cgroup.subtree_control").write_text("+memory +misc\n")
        yield daemon
    finally:
        daemon.stop()
        assert not is_mounted(mp), f"{mp} still mounted"
        log = daemon.log.read_text()
        assert "Traceback" not in log, f"a handler failed unexpectedly:\n{log}"
