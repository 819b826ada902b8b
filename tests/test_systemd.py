"""systemd/epcfs.service and what it relies on: the sd_notify readiness protocol, the unit
file itself (systemd-analyze verify where it exists) and scripts/install-service."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from epcfs.protocol import default_socket

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
    message = sock.recv(4096)
    # At this very moment the mount must already serve the file: no retry.
    with open(mp / "misc.capacity") as f:
        assert f.read() == f"sgx_epc {128 << 20}\n"
    fields = message.decode().split("\n")
    assert "READY=1" in fields and "STATUS=serving" in fields
    assert f"MAINPID={proc.pid}" in fields
    proc.send_signal(signal.SIGTERM)
    with sock:
        stopping = sock.recv(4096).decode().split("\n")
    assert "STOPPING=1" in stopping
    assert any(f.startswith("STATUS=unmounting") for f in stopping)
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
    assert "EPCFS_MOUNTPOINT=/run/epcfs/cgroup" in env
    assert service["ExecStart"] == (
        "/usr/local/bin/epcfs mount --foreground $EPCFS_OPTIONS ${EPCFS_MOUNTPOINT}")
    assert service["ExecStopPost"].startswith("-/usr/bin/fusermount3 -u")
    assert service["Delegate"] == "yes"  # the membership mirror lives in its own cgroup
    assert ("Install", "WantedBy", "multi-user.target") in entries
    assert int(service["OOMScoreAdjust"]) < 0
    assert service["RestrictAddressFamilies"] == "AF_UNIX AF_NETLINK"
    for key in ("NoNewPrivileges", "LockPersonality", "MemoryDenyWriteExecute"):
        assert service[key] == "yes", key
    # Nothing that gives the service its own mount namespace: the mount must be the host's.
    for key in ("ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices",
                "ProtectKernelTunables", "ProtectKernelModules", "ProtectControlGroups",
                "PrivateMounts", "ProtectProc", "ReadOnlyPaths"):
        assert key not in service, key
    assert ("Unit", "Documentation", "file:/usr/local/share/doc/epcfs/README.md") in entries


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze not installed (Debian package systemd)")
def test_security_exposure_is_what_the_readme_says(tmp_path):
    """systemd-analyze security works offline on a unit file (no running systemd)."""
    unit = tmp_path / "epcfs.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/epcfs", str(BIN / "epcfs")))
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)],
                            capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL)
    score = re.search(r"Overall exposure level for epcfs.service: (\d+\.\d)", result.stdout)
    assert score, result.stdout + result.stderr
    readme = (REPO / "README.md").read_text()
    assert f"| now | {score.group(1)} " in readme


def test_default_file_matches_the_unit_defaults():
    text = (REPO / "systemd/epcfs.default").read_text()
    values = dict(line.split("=", 1) for line in text.splitlines()
                  if line and not line.startswith("#"))
    assert values == {"EPCFS_MOUNTPOINT": "/run/epcfs/cgroup", "EPCFS_OPTIONS": ""}


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


# The unit's ExecStart at its default paths --------------------------------------------------

PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1
"""prctl(2) values behind MemoryDenyWriteExecute= (kernel 6.3+): what systemd applies."""


def unit_command(entries, key: str) -> str:
    """The unit's `key` command line as systemd runs it with the unit's own Environment=
    (EnvironmentFile= absent): $VAR split into words, ${VAR} as one; our venv's epcfs."""
    env = dict(v.split("=", 1) for s, k, v in entries if s == "Service" and k == "Environment")
    [line] = [v for s, k, v in entries if s == "Service" and k == key]
    words = []
    for word in line.lstrip("-").split():
        if word.startswith("${"):
            words.append(env[word[2:-1]])
        elif word.startswith("$"):
            words += env[word[1:]].split()
        else:
            words.append(word.replace("/usr/local/bin/epcfs", str(BIN / "epcfs")))
    return " ".join(words)


def capability_set(entries) -> str:
    """CapabilityBoundingSet= as setpriv's --bounding-set argument."""
    [caps] = [v for s, k, v in entries if s == "Service" and k == "CapabilityBoundingSet"]
    return ",".join(["-all", *("+" + c.removeprefix("CAP_").lower() for c in caps.split())])


def _deny_write_execute() -> None:
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0)


def fuse_abort(pid: int) -> None:
    """Abort the FUSE connections of `pid`'s mount namespace: a daemon stuck on its own
    mount (state D) cannot die of a signal before its request is answered."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/mountinfo") as f:
        for line in f:
            fields, _, tail = line.partition(" - ")
            if tail.startswith("fuse.epcfs "):
                minor = fields.split()[2].split(":")[1]
                with open(f"/sys/fs/fuse/connections/{minor}/abort", "w") as abort:
                    abort.write("1")


def test_the_units_execstart_at_its_default_paths_serves(ready_notice):
    """ExecStartPre and ExecStart as systemd runs them at the unit's defaults, in a
    private mount namespace (a tmpfs on /run/epcfs there keeps the host's untouched),
    with the unit's NoNewPrivileges, CapabilityBoundingSet and MemoryDenyWriteExecute.
    Before the socket moved out of the mountpoint this hung in state D forever."""
    entries = unit_entries(UNIT.read_text())
    service = {k: v for s, k, v in entries if s == "Service"}
    assert service["NoNewPrivileges"] == "yes" and service["MemoryDenyWriteExecute"] == "yes"
    mountpoint = unit_command(entries, "ExecStart").split()[-1]
    script = (f"mount -t tmpfs -o mode=755 epcfs-test /run/epcfs && "
              f"{unit_command(entries, 'ExecStartPre')} && "
              f"exec setpriv --no-new-privs --bounding-set {capability_set(entries)} "
              f"{unit_command(entries, 'ExecStart')}")
    os.makedirs("/run/epcfs", exist_ok=True)
    notice = ready_notice()
    proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                             script], env=notice.env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=_deny_write_execute)
    inside = ["nsenter", f"--target={proc.pid}", "--mount"]
    try:
        deadline = time.monotonic() + TIMEOUT
        while not notice.ready():
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "the daemon never said READY=1"
            time.sleep(0.05)
        cat = subprocess.run([*inside, "cat", f"{mountpoint}/misc.capacity"],
                             capture_output=True, text=True, timeout=TIMEOUT)
        assert cat.stdout == f"sgx_epc {128 << 20}\n"
        sock = default_socket(mountpoint)
        assert not sock.startswith(mountpoint + "/")
        load = subprocess.run([*inside, str(BIN / "epcfs"), "load", "--size", "1M",
                               "--hold", "0", "--socket", sock],
                              capture_output=True, text=True, timeout=TIMEOUT)
        assert load.returncode == 0, load.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 0
    finally:
        notice.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                fuse_abort(proc.pid)
                proc.kill()
                proc.wait(TIMEOUT)
        proc.stdout.close()


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
    doc = tmp_path / "usr/local/share/doc/epcfs/README.md"
    assert doc.read_text() == (REPO / "README.md").read_text()
    [documentation] = [v for s, k, v in unit_entries(UNIT.read_text()) if k == "Documentation"]
    assert documentation == "file:/" + doc.relative_to(tmp_path).as_posix()
    defaults = tmp_path / "etc/default/epcfs"
    assert defaults.read_text() == (REPO / "systemd/epcfs.default").read_text()

    defaults.write_text("EPCFS_MOUNTPOINT=/srv/cg\nEPCFS_OPTIONS=--capacity 1G\n")
    install()  # again: idempotent, and the administrator's settings stay
    assert defaults.read_text().startswith("EPCFS_MOUNTPOINT=/srv/cg")

    install("--uninstall")
    assert not link.exists() and not link.is_symlink()
    assert not (tmp_path / "etc/systemd/system/epcfs.service").exists()
    assert not doc.exists()
    assert defaults.exists()
