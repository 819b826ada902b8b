"""`epcfs top` against real daemons (`epcfs mount -f` in a subprocess), as a script runs
it (-b) and as a person does, in a terminal (tmux: send-keys, capture-pane)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from epcfs.protocol import default_socket
from epcfs.service.registry import DAEMONS_DIR, Entry

EPCFS = [sys.executable, "-m", "epcfs.cli"]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mounts)")


def wait_for(predicate, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def top(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*EPCFS, "top", *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def loaded(mount_epcfs):
    """A daemon whose cgroup /w (limit 4M) holds an 8M enclave: reclaimed to its limit."""
    daemon = mount_epcfs("--capacity", "16M", "--time-scale", "0")
    w = daemon.path / "w"
    w.mkdir()
    (w / "misc.max").write_text("sgx_epc 4194304\n")
    env = dict(os.environ, EPCFS_SOCKET=default_socket(str(daemon.path)),
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    holder = subprocess.Popen(
        ["sh", "-c", f'echo $$ > {w}/cgroup.procs && exec epcfs load --size 8M --hold 60'],
        env=env, stdout=subprocess.DEVNULL)
    try:
        wait_for(lambda: int((w / "misc.current").read_text().split()[1]) > 3 << 20,
                 what="the enclave to fill its limit")
        time.sleep(0.5)  # its work item's last round
        yield daemon
    finally:
        holder.send_signal(signal.SIGTERM)
        holder.wait(10)


def test_batch_frames_show_each_cgroup(loaded):
    """-b -n 2: two plain-text frames of the daemon, one row per cgroup; the rates need
    two frames, so the first shows `-`."""
    result = top("-b", "-n", "2", "-d", "0.3", "--daemon", str(loaded.proc.pid))
    assert result.returncode == 0, result.stderr
    frames = result.stdout.split("\n\n")
    assert len(frames) == 2
    for n, frame in enumerate(frames):
        title, header, root, w = frame.strip("\n").splitlines()
        assert title.startswith(f"epcfs daemon {loaded.proc.pid} at {loaded.path}, EPC ")
        assert " of 16.0M used: " in title
        assert "mount" in title
        assert header.split() == ["Control", "Group", "EPC", "EPC", "max", "EPC", "peak", "max",
                                  "events", "Memory", "Mem", "max", "OOM", "kills", "EWB/s",
                                  "ELDU/s", "Enclaves", "Procs"]
        cells = w.split()
        assert cells[0] == "/w" and cells[2] == "4.0M"
        assert cells[1].endswith("M") and 3.0 < float(cells[1][:-1]) <= 4.0
        assert int(cells[4]) > 0  # the charges that hit the limit
        assert cells[8:10] == (["-", "-"] if n == 0 else ["0", "0"])  # holding: no reclaim
        assert cells[10:] == ["1", "1"]
        assert root.split()[0] == "/"


def test_filters_pick_one_daemon_and_stale_entries_are_skipped(loaded, mount_epcfs):
    other = mount_epcfs("--capacity", "8M")
    result = top("-b", "-n", "1", "--mountpoint", str(other.path))
    assert result.returncode == 0, result.stderr
    assert f"epcfs daemon {other.proc.pid} at {other.path}," in result.stdout
    assert str(loaded.path) not in result.stdout
    # A daemon killed with SIGKILL leaves its registry file; its pid is gone.
    gone = subprocess.Popen(["true"])
    gone.wait()
    entry = Entry(gone.pid, "/nowhere", "/nowhere.sock", "mnt:[1]",
                  os.readlink("/proc/self/ns/pid"))
    stale = Path(DAEMONS_DIR) / entry.filename()
    stale.write_text(json.dumps(asdict(entry)))
    try:
        result = top("-b", "-n", "1", "--daemon", str(gone.pid))
        assert (result.returncode, result.stdout) == (1, "")
        assert result.stderr == "epcfs top: no epcfs daemon is running\n"
        assert "/nowhere" not in top("-b", "-n", "1").stdout
        mount_epcfs("--capacity", "8M")  # the next daemon to register clears it away
        assert not stale.exists()
    finally:
        stale.unlink(missing_ok=True)


def test_a_stopped_daemon_unregisters(mount_epcfs):
    daemon = mount_epcfs("--capacity", "8M")
    (entry,) = Path(DAEMONS_DIR).glob(f"*-{daemon.proc.pid}.json")
    assert json.loads(entry.read_text()) == {
        "pid": daemon.proc.pid, "mountpoint": str(daemon.path),
        "socket": default_socket(str(daemon.path)), "namespace": os.readlink("/proc/self/ns/mnt"),
        "pidns": os.readlink("/proc/self/ns/pid")}
    assert daemon.stop() == 0
    assert not entry.exists()


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed")
def test_live_table_in_a_terminal(loaded, tmp_path):
    """As a person runs it: the table in the terminal, `e` orders by EPC, `q` quits."""
    session = f"epcfs-top-{os.getpid()}"
    socket = str(tmp_path / "tmux.sock")
    tmux = ["tmux", "-S", socket]
    command = " ".join([*EPCFS, "top", "-d", "0.3", "--daemon", str(loaded.proc.pid)])
    # pytest's COLUMNS=80 would reach the session: a terminal's own size must decide.
    subprocess.run([*tmux, "new-session", "-d", "-s", session, "-x", "180", "-y", "30",
                    f"cd {Path(__file__).resolve().parents[2]} && env -u COLUMNS -u LINES "
                    f"{command}"], check=True)

    def screen() -> str:
        return subprocess.run([*tmux, "capture-pane", "-p", "-t", session],
                              capture_output=True, text=True).stdout

    try:
        text = wait_for(lambda: "│ /w " in screen() and screen(), what="the live table")
        assert "Control Group" in text and "EWB/s" in text, text
        assert f"epcfs daemon {loaded.proc.pid} at {loaded.path}" in text
        row = next(line for line in text.splitlines() if "│ /w " in line)
        assert row.split("│")[3].strip() == "4.0M"  # EPC max
        assert "order: path" in text
        subprocess.run([*tmux, "send-keys", "-t", session, "e"], check=True)
        wait_for(lambda: "order: epc" in screen(), what="the order to change")
        subprocess.run([*tmux, "send-keys", "-t", session, "q"], check=True)
        wait_for(lambda: subprocess.run([*tmux, "has-session", "-t", session],
                                        capture_output=True).returncode != 0,
                 what="top to quit on q")
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)


def test_order_sorts_rows_largest_first(loaded):
    (loaded.path / "b").mkdir()
    by = {}
    for order in ("path", "epc"):
        result = top("-b", "-n", "1", "--order", order, "--daemon", str(loaded.proc.pid))
        assert result.returncode == 0, result.stderr
        by[order] = [line.split()[0] for line in result.stdout.splitlines()[2:]]
    assert by == {"path": ["/", "/b", "/w"], "epc": ["/", "/w", "/b"]}
    (loaded.path / "b").rmdir()
