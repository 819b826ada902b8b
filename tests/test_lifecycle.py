"""The daemon's life through a real mount: start, serve, stop, crash, restart; and the CLI.

Every daemon runs in a subprocess. The `daemons` fixture tracks each mountpoint it hands
out and, whatever the test's outcome, stops whatever serves there (SIGTERM, then SIGKILL),
lifts any mount left (fusermount3 -u -z) and then asserts that none is.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
EPCFS = [str(BIN / "epcfs")] if (BIN / "epcfs").exists() else [sys.executable, "-m", "epcfs.cli"]
TEST_SGX = BIN / "test_sgx"
TIMEOUT = 15.0
"""Seconds a daemon may take to come up or go away on a loaded two-core CI machine."""

MiB = 1 << 20


def mounts_at(path: Path) -> int:
    """How many mounts are stacked at `path` (0: not a mountpoint)."""
    target = os.fsencode(os.path.realpath(path))
    with open("/proc/self/mountinfo", "rb") as f:
        return sum(1 for line in f if line.split()[4] == target)


def read_capacity(path: Path) -> str:
    return subprocess.run(["cat", str(path / "misc.capacity")], capture_output=True,
                          text=True, check=True, timeout=TIMEOUT).stdout


def daemon_pids(path: Path) -> list[int]:
    """Processes whose command line names `path`: the daemons serving it (tmp paths are
    unique to a test, so nothing else matches)."""
    arg = os.fsencode(str(path))
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if arg in argv and b"mount" in argv:
            pids.append(int(entry.name))
    return pids


def is_gone(pid: int) -> bool:
    """Exited (a zombie awaiting its reaper counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_until(predicate, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.02)


def wait_stale(path: Path) -> None:
    """Wait until `path` is a dead mount: statfs always reaches the (dead) daemon and fails
    with ENOTCONN, while a plain stat may still be answered from the kernel's attribute
    cache until it expires (ENTRY_TIMEOUT), after which it fails too."""

    def stale() -> bool:
        try:
            os.statvfs(path)
        except OSError as e:
            assert e.errno in (errno.ENOTCONN, errno.ECONNABORTED), e
            return True
        return False

    wait_until(stale, f"{path} is a stale mount")


class Daemons:
    def __init__(self, tmp_path: Path, ready_notice) -> None:
        self.tmp = tmp_path
        self.ready_notice = ready_notice
        self.paths: list[Path] = []
        self.procs: list[subprocess.Popen] = []

    def mountpoint(self) -> Path:
        path = self.tmp / f"mnt{len(self.paths)}"
        path.mkdir()
        self.paths.append(path)
        return path

    def foreground(self, path: Path, *args: str, env: dict[str, str] | None = None,
                   wait: bool = True) -> subprocess.Popen:
        """`epcfs mount -f PATH ARGS` in a subprocess; by default, wait until it serves
        and has said READY=1 (then it is done settling, as systemd would see it)."""
        notice = self.ready_notice(env) if wait else None
        log = open(self.tmp / f"{path.name}.{len(self.procs)}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen([*EPCFS, "mount", "-f", str(path), *args], stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT,
                                env=notice.env if notice else env, cwd=REPO)
        log.close()
        self.procs.append(proc)
        if notice:
            try:
                wait_until(lambda: proc.poll() is not None
                           or (self.serving(path) and notice.ready()), f"epcfs serves {path}")
            finally:
                notice.close()
            assert proc.poll() is None, f"epcfs exited with {proc.returncode}"
        return proc

    def detached(self, path: Path, *args: str) -> subprocess.CompletedProcess:
        """`epcfs mount PATH ARGS`: returns once the daemon has detached (or failed)."""
        return subprocess.run([*EPCFS, "mount", str(path), *args], stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=TIMEOUT, cwd=REPO)

    @staticmethod
    def serving(path: Path) -> bool:
        """A live epcfs answers at `path`. statfs first: a stale mount can still answer a
        stat of misc.capacity from the kernel's caches, but never a statfs."""
        try:
            os.statvfs(path)
            os.stat(path / "misc.capacity")
        except OSError:
            return False
        return mounts_at(path) > 0

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(TIMEOUT)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for path in self.paths:
            pids = daemon_pids(path)
            for pid in pids:
                _kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + TIMEOUT
            while any(not is_gone(p) for p in pids) and time.monotonic() < deadline:
                time.sleep(0.02)
            for pid in pids:
                _kill(pid, signal.SIGKILL)
            while mounts_at(path):
                subprocess.run(["fusermount3", "-u", "-z", str(path)], check=False)
                if mounts_at(path):
                    subprocess.run(["umount", "-l", str(path)], check=True)


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


@pytest.fixture
def daemons(tmp_path: Path, ready_notice) -> Iterator[Daemons]:
    d = Daemons(tmp_path, ready_notice)
    try:
        yield d
    finally:
        d.cleanup()
    for path in d.paths:
        assert mounts_at(path) == 0, f"{path} still mounted"


# Serving misc.capacity ------------------------------------------------------------------


@pytest.mark.parametrize(("option", "expected"), [
    ("64M", 64 * MiB), ("128M", 128 * MiB), ("1G", 1024 * MiB), ("4096K", 4 * MiB),
    (None, 128 * MiB),
])
def test_capacity_as_cat_sees_it(mount_epcfs, option, expected):
    d = mount_epcfs(*(["--capacity", option] if option else []))
    assert read_capacity(d.path) == f"sgx_epc {expected}\n"


# Stopping --------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP],
                         ids=lambda s: s.name)
def test_stop_signal_unmounts_and_exits_0(daemons, sig):
    path = daemons.mountpoint()
    proc = daemons.foreground(path)
    proc.send_signal(sig)
    assert proc.wait(TIMEOUT) == 0
    assert mounts_at(path) == 0


def test_external_unmount_ends_the_daemon_with_0(daemons):
    path = daemons.mountpoint()
    proc = daemons.foreground(path)
    subprocess.run(["fusermount3", "-u", str(path)], check=True, timeout=TIMEOUT)
    assert proc.wait(TIMEOUT) == 0
    assert mounts_at(path) == 0


# Crashing and starting again ---------------------------------------------------------------


def test_kill9_leaves_a_stale_mount_that_the_next_foreground_mount_clears(daemons):
    path = daemons.mountpoint()
    proc = daemons.foreground(path, "--capacity", "64M")
    proc.kill()
    proc.wait(TIMEOUT)
    wait_stale(path)
    daemons.foreground(path, "--capacity", "1G")
    assert read_capacity(path) == f"sgx_epc {1024 * MiB}\n"
    assert mounts_at(path) == 1, "the stale mount was covered, not cleared"


def test_kill9_then_detached_mount_on_the_same_path(daemons):
    path = daemons.mountpoint()
    assert daemons.detached(path, "--capacity", "64M").returncode == 0
    [pid] = daemon_pids(path)
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: is_gone(pid), f"pid {pid} exits")
    wait_stale(path)
    result = daemons.detached(path, "--capacity", "4096K")
    assert result.returncode == 0, result.stderr
    assert read_capacity(path) == f"sgx_epc {4 * MiB}\n"
    assert mounts_at(path) == 1, "the stale mount was covered, not cleared"


# Detaching ---------------------------------------------------------------------------------


def test_detached_mount_returns_0_only_once_the_mount_answers(daemons):
    path = daemons.mountpoint()
    result = daemons.detached(path, "--capacity", "1G")
    assert result.returncode == 0, result.stderr
    # No retry: the command's return is the promise that the files are there.
    assert read_capacity(path) == f"sgx_epc {1024 * MiB}\n"
    [pid] = daemon_pids(path)
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: is_gone(pid), f"pid {pid} exits")
    assert mounts_at(path) == 0


def test_detached_mount_on_a_missing_directory_fails(daemons, tmp_path):
    path = tmp_path / "absent"
    result = daemons.detached(path)
    assert result.returncode != 0
    assert f"{path}: No such file or directory" in result.stderr
    assert not path.exists()


@pytest.mark.parametrize("option", ["--pidfile", "--trace"])
def test_an_unwritable_pidfile_or_trace_fails_the_start_and_leaves_nothing(daemons, tmp_path,
                                                                          option):
    path = tmp_path / "mnt"
    path.mkdir()
    from epcfs.host.mirror import own_cgroup_dir

    daemon = subprocess.Popen([*EPCFS, "mount", "-f", str(path), "--membership", "cgroup",
                               option, str(tmp_path / "absent" / "file")],
                              stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, stderr = daemon.communicate(timeout=TIMEOUT)
    assert daemon.returncode == 1
    assert f"{option} {tmp_path}/absent/file: No such file or directory" in stderr
    assert "Traceback" not in stderr
    assert mounts_at(path) == 0
    directory, _ = own_cgroup_dir()
    assert not [name for name in os.listdir(directory) if f"-{daemon.pid}-" in name]


# One daemon per mountpoint and per socket ----------------------------------------------------


def connects(sock: Path) -> bool:
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        try:
            s.connect(str(sock))
        except OSError:
            return False
    return True


def test_a_second_mount_on_a_live_epcfs_is_refused(daemons, tmp_path):
    path = daemons.mountpoint()
    sock = tmp_path / "encl.sock"
    first = daemons.foreground(path, "--capacity", "64M", "--enclave-socket", str(sock))
    for attempt in (daemons.detached(path, "--capacity", "1G"),
                    daemons.detached(path, "--enclave-socket", str(tmp_path / "other.sock"))):
        assert attempt.returncode == 1
        assert "a live epcfs daemon already serves it" in attempt.stderr
        assert "Traceback" not in attempt.stderr
    assert mounts_at(path) == 1
    assert read_capacity(path) == f"sgx_epc {64 * MiB}\n"
    assert connects(sock)
    first.send_signal(signal.SIGTERM)
    assert first.wait(TIMEOUT) == 0
    assert not sock.exists()


def test_a_second_daemon_never_takes_or_unlinks_a_live_socket(daemons, tmp_path):
    sock = tmp_path / "encl.sock"
    daemons.foreground(daemons.mountpoint(), "--enclave-socket", str(sock))
    other = daemons.mountpoint()
    result = daemons.detached(other, "--enclave-socket", str(sock))
    assert result.returncode == 1
    assert "another epcfs daemon is serving it" in result.stderr
    assert mounts_at(other) == 0
    assert connects(sock), "the first daemon's socket is gone"


def test_a_socket_inside_the_mountpoint_is_refused(daemons):
    path = daemons.mountpoint()
    result = daemons.detached(path, "--enclave-socket", str(path / "sockets/x.sock"))
    assert result.returncode == 1
    assert "inside the mountpoint" in result.stderr
    assert mounts_at(path) == 0


def test_the_socket_mode_follows_the_sgx_device(daemons, tmp_path):
    """0660 and group sgx where that group exists (Debian's udev rule), else 0600;
    --socket-mode adds bits."""
    import grp
    import stat

    try:
        gid = grp.getgrnam("sgx").gr_gid
    except KeyError:
        gid = None
    plain, wide = tmp_path / "plain.sock", tmp_path / "wide.sock"
    daemons.foreground(daemons.mountpoint(), "--enclave-socket", str(plain))
    daemons.foreground(daemons.mountpoint(), "--enclave-socket", str(wide),
                       "--socket-mode", "0666")
    st = plain.stat()
    assert stat.S_IMODE(st.st_mode) == (0o600 if gid is None else 0o660)
    if gid is not None:
        assert st.st_gid == gid
    assert stat.S_IMODE(wide.stat().st_mode) == 0o666


# The log and the pid file of a detached daemon ------------------------------------------------


def test_a_detached_daemon_logs_to_its_file_and_writes_its_pidfile(daemons, tmp_path):
    path = daemons.mountpoint()
    log, pidfile = tmp_path / "epcfs.log", tmp_path / "epcfs.pid"
    result = daemons.detached(path, "--log", str(log), "--pidfile", str(pidfile))
    assert result.returncode == 0, result.stderr
    [pid] = daemon_pids(path)
    assert pidfile.read_text() == f"{pid}\n"
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: is_gone(pid), f"pid {pid} exits")
    assert "unmounting" in log.read_text()  # logged after detaching: kept
    assert not pidfile.exists()


def test_a_detached_daemon_logs_under_run_epcfs_by_default(daemons):
    from epcfs.service.daemon import default_log

    path = daemons.mountpoint()
    log = Path(default_log(str(path)))
    try:
        assert daemons.detached(path).returncode == 0
        [pid] = daemon_pids(path)
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: is_gone(pid), f"pid {pid} exits")
        assert log.parent == Path("/run/epcfs/log")
        assert "unmounting" in log.read_text()
    finally:
        log.unlink(missing_ok=True)


# The command line ---------------------------------------------------------------------------


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=TIMEOUT,
                          stdin=subprocess.DEVNULL)


def test_epcfs_help_lists_the_subcommands():
    from epcfs.cli import SUBCOMMANDS

    result = run_cli(*EPCFS, "--help")
    assert result.returncode == 0, result.stderr
    for name, _, _ in SUBCOMMANDS:
        assert name in result.stdout


def test_epcfs_mount_help_describes_every_option():
    result = run_cli(*EPCFS, "mount", "--help")
    assert result.returncode == 0, result.stderr
    for word in ("MOUNTPOINT", "--capacity", "-f, --foreground", "-d, --debug", "128M"):
        assert word in result.stdout


def test_every_subcommand_has_help():
    from epcfs.cli import SUBCOMMANDS

    for name, _, _ in SUBCOMMANDS:
        result = run_cli(*EPCFS, name, "--help")
        assert result.returncode == 0, (name, result.stderr)
        assert result.stdout.startswith("usage: epcfs " + name), name


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_test_sgx_help(flag):
    # A drop-in for the kselftest binary answers as its harness does: usage on stderr, with
    # the harness's exit codes (-h: 4, KSFT_SKIP; --help: getopt's "invalid option", 1).
    result = run_cli(str(TEST_SGX), flag)
    assert "Usage:" in result.stderr
    for option in ("-l", "-t name", "-r name"):
        assert option in result.stderr


def test_epcfs_without_a_command_is_a_usage_error():
    result = run_cli(*EPCFS)
    assert result.returncode == 2
    assert "usage:" in result.stderr


def test_a_bad_size_is_a_usage_error(tmp_path):
    result = run_cli(*EPCFS, "mount", "--capacity", "12X", str(tmp_path))
    assert result.returncode == 2
    assert "not a size" in result.stderr
    assert mounts_at(tmp_path) == 0


@pytest.mark.parametrize("argv", [
    ["--capacity", "0"], ["--capacity", "100"], ["--capacity", "4097"], ["--capacity", "-1"],
    ["--capacity", "²"], ["--epc-section", "0:4097"], ["--epc-section", "0:0"],
    ["--socket-mode", "999"], ["--time-scale", "nan"], ["--time-scale", "-1"],
    ["--time-scale", "inf"], ["--root-controllers", "cpu"],
])
def test_a_bad_mount_option_is_a_usage_error(tmp_path, argv):
    result = run_cli(*EPCFS, "mount", *argv, str(tmp_path))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "error: argument" in result.stderr
    assert mounts_at(tmp_path) == 0


def test_version_and_python_m_epcfs():
    from importlib.metadata import version

    for argv in (EPCFS, [sys.executable, "-m", "epcfs"]):
        result = run_cli(*argv, "--version")
        assert result.returncode == 0, result.stderr
        assert result.stdout == f"epcfs {version('epcfs')}\n"


@pytest.mark.parametrize("command", [["run", "--", "true"], ["selftest", "/dev/null"]])
def test_run_and_selftest_without_root_skip_with_4(command, tmp_path):
    """As the kernel's SGX scripts do: kselftest's KSFT_SKIP and one clear line."""
    script = tmp_path / "run_epc_cg_selftests.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    argv = [*command[:-1], str(script)] if command[0] == "selftest" else command
    result = run_cli("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                     *EPCFS, *argv)
    assert result.returncode == 4, result.stderr
    assert "needs root" in result.stderr and "Traceback" not in result.stderr


# The bootstrap contract -------------------------------------------------------------------


def test_ci_runs_exactly_the_readme_test_command():
    lines = [line.strip() for line in (REPO / ".ci/run").read_text().splitlines()]
    last = [line for line in lines if line and not line.startswith("#")][-1]
    assert last == "scripts/test"
    readme = (REPO / "README.md").read_text()
    assert re.search(r"^scripts/test$", readme, re.M), "README does not show scripts/test"
    assert re.search(r"^scripts/demo$", readme, re.M), "README does not show scripts/demo"


def test_scripts_are_executable():
    for name in ("scripts/setup", "scripts/test", "scripts/demo", "scripts/install-service",
                 ".ci/run"):
        assert os.access(REPO / name, os.X_OK), name


@pytest.mark.skipif(os.geteuid() != 0, reason="the demo needs root (a mount namespace)")
def test_the_demo_runs_and_leaves_nothing_behind():
    before = mounts_at(Path("/sys/fs/cgroup"))
    result = subprocess.run([str(REPO / "scripts/demo")], capture_output=True, text=True,
                            timeout=300, stdin=subprocess.DEVNULL,
                            env=dict(os.environ, EPCFS_CAPACITY="1G",
                                     EPCFS_SCENARIO_CAPACITY="16M"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"sgx_epc {1024 * MiB}\n" in result.stdout
    assert "epcfs exited with status 0" in result.stdout
    assert "# scenario passed" in result.stdout
    assert mounts_at(Path("/sys/fs/cgroup")) == before, "the host's /sys/fs/cgroup changed"


def test_run_finds_test_sgx_without_an_activated_venv():
    """`.venv/bin/epcfs run -- test_sgx` said `test_sgx: No such file or directory`: CMD's
    PATH now starts with the directory of epcfs's own scripts."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"}
    result = subprocess.run([str(BIN / "epcfs"), "run", "--capacity", "8M", "--", "test_sgx",
                             "-l"], capture_output=True, text=True, timeout=60, env=env,
                            stdin=subprocess.DEVNULL)
    # The kselftest harness lists its tests with -l on stderr and exits 4, as test_sgx.
    assert "unclobbered_vdso" in result.stdout + result.stderr, result.stderr
    assert "No such file or directory" not in result.stderr
