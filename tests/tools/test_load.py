"""`epcfs load` against a real daemon: it holds an enclave, and says so and exits 1 when
the daemon goes away under it (it used to wait for ever, or print `None after 0 bytes`);
bad --hold values are argument errors."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
EPCFS = [str(BIN / "epcfs")] if (BIN / "epcfs").exists() else [sys.executable, "-m", "epcfs"]
TIMEOUT = 15.0
"""Seconds a daemon or a load may take on a loaded two-core machine."""


def start_load(sock: Path, *args: str) -> subprocess.Popen:
    proc = subprocess.Popen([*EPCFS, "load", "--size", "1M", "--socket", str(sock), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert "holds an enclave of 1048576 bytes" in line, proc.stderr.read()
    return proc


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_load_exits_1_when_the_daemon_goes_away(mount_epcfs, tmp_path, how):
    sock = tmp_path / "encl.sock"
    daemon = mount_epcfs("--enclave-socket", str(sock))
    load = start_load(sock)
    assert (daemon.path / "misc.current").read_text() != "sgx_epc 0\n"
    daemon.proc.send_signal(how)
    assert load.wait(TIMEOUT) == 1
    assert load.stderr.read() == "epcfs load: the epcfs daemon went away\n"
    load.stdout.close()
    load.stderr.close()


def test_load_holds_for_hold_seconds_then_releases(mount_epcfs, tmp_path):
    sock = tmp_path / "encl.sock"
    daemon = mount_epcfs("--enclave-socket", str(sock))
    load = start_load(sock, "--hold", "0.2")
    assert load.wait(TIMEOUT) == 0
    load.stdout.close()
    load.stderr.close()
    deadline = time.monotonic() + TIMEOUT
    while (daemon.path / "misc.current").read_text() != "sgx_epc 0\n":
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_load_without_a_daemon_says_so(tmp_path):
    result = subprocess.run([*EPCFS, "load", "--size", "1M", "--socket",
                             str(tmp_path / "none.sock")], capture_output=True, text=True,
                            timeout=TIMEOUT)
    assert result.returncode == 1
    assert "cannot reach the epcfs daemon" in result.stderr


@pytest.mark.parametrize("hold", ["-1", "nan", "inf", "-inf", "x", ""])
def test_a_bad_hold_is_an_argument_error(hold):
    result = subprocess.run([*EPCFS, "load", "--size", "1M", "--hold", hold],
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 2
    assert "argument --hold" in result.stderr and "Traceback" not in result.stderr
