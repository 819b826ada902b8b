"""Helpers for real-mount tests: shell commands and their outcomes, polling, processes."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

TIMEOUT = 10.0
"""Seconds a condition may take to become true on a loaded two-core machine."""


@dataclass
class Result:
    rc: int
    out: str
    err: str

    @property
    def ok(self) -> bool:
        return self.rc == 0


def sh(command: str, cwd: Path | str | None = None, shell: str = "sh",
       env: dict[str, str] | None = None) -> Result:
    """Run `command` with `shell -c` (dash by default, as /bin/sh on these machines)."""
    p = subprocess.run([shell, "-c", command], cwd=cwd, capture_output=True, text=True,
                       env=None if env is None else {**os.environ, **env}, timeout=30)
    return Result(p.returncode, p.stdout, p.stderr)


def bash(command: str, cwd: Path | str | None = None, env: dict[str, str] | None = None):
    """bash prints the errno of a failed `echo >` (dash always says "I/O error")."""
    return sh(command, cwd, "bash", env)


def message(err: int) -> str:
    return os.strerror(err)


def read(path: Path | str) -> str:
    with open(path) as f:
        return f.read()


def errno_of(fn, *args) -> int:
    """The errno `fn(*args)` fails with, or 0."""
    try:
        fn(*args)
    except OSError as e:
        return e.errno
    return 0


def write(path: Path | str, text: str) -> int:
    """One write() of `text` to an existing file; the errno, or 0."""
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError as e:
        return e.errno
    try:
        os.write(fd, text.encode("latin-1"))
    except OSError as e:
        return e.errno
    finally:
        os.close(fd)
    return 0


def wait_for(condition, timeout: float = TIMEOUT, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def pids(cg: Path) -> list[int]:
    return [int(line) for line in read(cg / "cgroup.procs").split()]


def sleeper(seconds: int = 60) -> subprocess.Popen:
    return subprocess.Popen(["sleep", str(seconds)])


def remove_tree(cg: Path) -> None:
    """Kill everything in `cg`'s subtree, then rmdir it bottom-up (a test's cleanup)."""
    if not cg.exists():
        return
    with contextlib.suppress(OSError):
        if (cg / "cgroup.kill").exists():
            write(cg / "cgroup.kill", "1")
    for sub in sorted((p for p in cg.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        _rmdir(sub)
    _rmdir(cg)


def _rmdir(path: Path) -> None:
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            for pid in pids(path):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.02)
