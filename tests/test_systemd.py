"""systemd/epcfs.service and what it relies on: the sd_notify readiness protocol, the unit
file itself (systemd-analyze verify where it exists) and scripts/install-service."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd/epcfs.service"
BIN = Path(sys.executable).parent
EPCFS = [str(BIN / "epcfs")] if (BIN / "epcfs").exists() else [sys.executable, "-m", "epcfs.cli"]
TIMEOUT = 15.0


def mounts_at(path: Path) -> int:
    target = os.fsencode(os.path.realpath(path))
    with open("/proc/self/mountinfo", "rb") as f:
        return sum(1 for line in f if line.split()[4] == target)


def unit_entries(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) in order; systemd allows a key more than once."""
    section, out = "", []
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
        else:
            key, _, value = line.partition("=")
            out.append((section, key.strip(), value.strip()))
    return out


# Readiness: READY=1 only once the mount answers ------------------------------------------


@pytest.fixture
def notify_daemon(tmp_path: Path) -> Iterator:
    """Start `epcfs mount -f` with NOTIFY_SOCKET set to a datagram socket bound here."""
    started: list[tuple[subprocess.Popen, Path]] = []

    def start(address: str) -> tuple[subprocess.Popen, socket.socket, Path]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind("\0" + address[1:] if address.startswith("@") else address)
        sock.settimeout(TIMEOUT)
        mp = tmp_path / "mnt"
        mp.mkdir()
        env = dict(os.environ, NOTIFY_SOCKET=address)
        proc = subprocess.Popen([*EPCFS, "mount", "-f", str(mp)], env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, cwd=REPO)
        started.append((proc, mp))
        return proc, sock, mp

    yield start
    for proc, mp in started:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if mounts_at(mp):
            subprocess.run(["fusermount3", "-u", "-z", str(mp)], check=False)
        assert mounts_at(mp) == 0


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_ready_1_arrives_once_misc_capacity_answers(notify_daemon, tmp_path, kind):
    address = str(tmp_path / "notify") if kind == "path" else f"@epcfs-test-{os.getpid()}"
    proc, sock, mp = notify_daemon(address)
    with sock:
        message = sock.recv(4096)
        # At this very moment the mount must already serve the file: no retry.
        with open(mp / "misc.capacity") as f:
            assert f.read() == f"sgx_epc {128 << 20}\n"
    fields = message.decode().split("\n")
    assert "READY=1" in fields
    assert f"MAINPID={proc.pid}" in fields
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(TIMEOUT) == 0
    assert mounts_at(mp) == 0


def test_without_notify_socket_nothing_is_sent(mount_epcfs):
    # The fixture's daemon has no NOTIFY_SOCKET; it must simply serve.
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    d = mount_epcfs(env=env)
    assert (d.path / "misc.capacity").read_text().startswith("sgx_epc ")


# The unit file -----------------------------------------------------------------------------


def test_unit_contract():
    entries = unit_entries(UNIT.read_text())
    service = {k: v for s, k, v in entries if s == "Service"}
    env = [v for s, k, v in entries if s == "Service" and k == "Environment"]
    assert service["Type"] == "notify"
    assert service["Restart"] == "on-failure"
    assert service["EnvironmentFile"] == "-/etc/default/epcfs"
    assert "EPCFS_MOUNTPOINT=/run/epcfs" in env
    assert service["ExecStart"] == (
        "/usr/local/bin/epcfs mount --foreground $EPCFS_OPTIONS ${EPCFS_MOUNTPOINT}")
    assert service["ExecStopPost"].startswith("-/usr/bin/fusermount3 -u")
    assert service["Delegate"] == "yes"  # the membership mirror lives in its own cgroup
    assert ("Install", "WantedBy", "multi-user.target") in entries


def test_default_file_matches_the_unit_defaults():
    text = (REPO / "systemd/epcfs.default").read_text()
    values = dict(line.split("=", 1) for line in text.splitlines()
                  if line and not line.startswith("#"))
    assert values == {"EPCFS_MOUNTPOINT": "/run/epcfs", "EPCFS_OPTIONS": ""}


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze not installed (Debian package systemd)")
def test_systemd_analyze_verify(tmp_path):
    # The installed unit runs /usr/local/bin/epcfs, a symlink scripts/install-service makes;
    # verify checks that ExecStart exists, so point it at this venv's epcfs instead.
    epcfs = BIN / "epcfs"
    if not epcfs.exists():
        pytest.skip("no epcfs console script next to this python")
    unit = tmp_path / "epcfs.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/epcfs", str(epcfs)))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                            text=True, timeout=60, stdin=subprocess.DEVNULL)
    about_us = [line for line in (result.stdout + result.stderr).splitlines()
                if "epcfs" in line]
    assert result.returncode == 0, result.stderr
    assert about_us == []


# scripts/install-service ---------------------------------------------------------------------


def test_install_service_into_a_root_directory(tmp_path):
    env = dict(os.environ, EPCFS_ROOT=str(tmp_path))
    script = [str(REPO / "scripts/install-service")]

    def install(*args: str) -> None:
        subprocess.run([*script, *args], env=env, check=True, timeout=120,
                       stdin=subprocess.DEVNULL, capture_output=True)

    install()
    link = tmp_path / "usr/local/bin/epcfs"
    assert os.readlink(link) == str(REPO / ".venv/bin/epcfs")
    assert (tmp_path / "etc/systemd/system/epcfs.service").read_text() == UNIT.read_text()
    defaults = tmp_path / "etc/default/epcfs"
    assert defaults.read_text() == (REPO / "systemd/epcfs.default").read_text()

    defaults.write_text("EPCFS_MOUNTPOINT=/srv/cg\nEPCFS_OPTIONS=--capacity 1G\n")
    install()  # again: idempotent, and the administrator's settings stay
    assert defaults.read_text().startswith("EPCFS_MOUNTPOINT=/srv/cg")

    install("--uninstall")
    assert not link.exists() and not link.is_symlink()
    assert not (tmp_path / "etc/systemd/system/epcfs.service").exists()
    assert defaults.exists()
