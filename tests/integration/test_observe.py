"""Watching runs end to end: `epcfs selftest --tap --trace --plot`, `epcfs run --plot`,
`epcfs top` on the daemon of a running selftest, and a killed daemon's trace.

The scripts are ours, shaped like the kernel's run_epc_cg_selftests.sh (cgroups with
sgx_epc limits, ./test_sgx loads through a sibling helper, `# Start`/`PASS:` lines).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from epcfs.service.registry import DAEMONS_DIR
from epcfs.service.trace import load

REPO = Path(__file__).resolve().parents[2]
EPCFS = [sys.executable, "-m", "epcfs.cli"]
ENV = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount namespaces)")

ENTER = '#!/bin/sh\necho 0 > "/sys/fs/cgroup/$1/cgroup.procs" && shift && exec "$@"\n'
"""The sibling helper, as ash_cgexec.sh: move into a cgroup, then exec the command."""

STAGED = """#!/bin/sh
cap=$(awk '$1 == "sgx_epc" { print $2 }' /sys/fs/cgroup/misc.capacity)
mkdir /sys/fs/cgroup/t /sys/fs/cgroup/t/small /sys/fs/cgroup/t/big || exit 1
echo "+misc +memory" > /sys/fs/cgroup/t/cgroup.subtree_control
echo "sgx_epc $((cap / 512))" > /sys/fs/cgroup/t/small/misc.max
echo "sgx_epc $((cap / 128))" > /sys/fs/cgroup/t/big/misc.max
echo "# Start a load under a tiny limit, expecting failure..."
if ./enter_cg.sh t/small ./test_sgx -t unclobbered_vdso_oversubscribed >/dev/null 2>&1; then
    echo "FAIL: loaded under a tiny limit"; exit 1
fi
echo "PASS: small limit."
echo "# Start two loads under a larger limit..."
./enter_cg.sh t/big ./test_sgx -t unclobbered_vdso_oversubscribed >/dev/null 2>&1 &
./enter_cg.sh t/big ./test_sgx -t unclobbered_vdso_oversubscribed >/dev/null 2>&1 &
wait
echo "PASS: large limit [done]."
rmdir /sys/fs/cgroup/t/small /sys/fs/cgroup/t/big /sys/fs/cgroup/t
"""
"""Two stages, each with its `# Start` and `PASS:` line; `[done]` is not rich markup."""

TAP_RESULT = re.compile(r"^(not )?ok 1 selftests: \S+: \S+( # (SKIP|exit=\d+))?$")


def script_dir(tmp_path: Path, body: str, *siblings: str) -> Path:
    d = tmp_path / "sgx"
    d.mkdir()
    script = d / "run_epc_cg_selftests.sh"
    script.write_text(body)
    script.chmod(0o755)
    for name in siblings:
        (d / name).write_text(ENTER)
        (d / name).chmod(0o755)
    return script


def selftest(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([*EPCFS, "selftest", *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def assert_tap13(out: str) -> list[str]:
    """Valid TAP 13 for one test: version, plan, comments, one result line last.
    Returns the comment lines without their `# `."""
    lines = out.splitlines()
    assert lines[:2] == ["TAP version 13", "1..1"]
    assert TAP_RESULT.match(lines[-1]), lines[-1]
    assert all(line == "#" or line.startswith("# ") for line in lines[2:-1]), lines
    return [line[2:] for line in lines[2:-1]]


def test_selftest_with_tap_trace_and_plot(tmp_path):
    """The Done-when of issue 14: TAP 13 a kernel CI reads, a trace Perfetto loads
    (parsed here: its tracks and events), and a PNG of the run."""
    script = script_dir(tmp_path, STAGED, "enter_cg.sh")
    trace, png = tmp_path / "t.json", tmp_path / "p.png"
    result = selftest("--capacity", "16M", "--tap", "--trace", str(trace), "--plot", str(png),
                      str(script))
    assert result.returncode == 0, result.stdout + result.stderr
    comments = assert_tap13(result.stdout)
    assert comments[0] == "selftests: sgx: run_epc_cg_selftests.sh"
    assert comments[1:] == ["# Start a load under a tiny limit, expecting failure...",
                            "PASS: small limit.", "# Start two loads under a larger limit...",
                            "PASS: large limit [done]."]
    assert result.stdout.splitlines()[-1] == "ok 1 selftests: sgx: run_epc_cg_selftests.sh"

    events = json.loads(trace.read_text())  # closed cleanly: strict JSON
    names = {e["name"] for e in events}
    for cg in ("/t/small", "/t/big"):
        assert {f"misc.current {cg}", f"misc.max {cg}", f"memory.current {cg}"} <= names
    assert max(e["args"]["bytes"] for e in events if e["name"] == "misc.current /t/big") > 0
    reclaim = [e for e in events if e["name"] in ("sync reclaim", "async reclaim")]
    assert reclaim and all(e["ph"] == "X" and e["dur"] >= 0 for e in reclaim)
    assert any(e["name"] == "ENOMEM" for e in events)  # the tiny limit's load
    moves = {e["args"]["cgroup"] for e in events if e["name"] == "move"}
    assert {"/t/small", "/t/big"} <= moves
    threads = {e["tid"]: e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert all(threads[e["tid"]] == f"pid {e['tid']}" for e in reclaim
               if e["name"] == "sync reclaim")  # each process's own named track
    stamps = [e["ts"] for e in events if "ts" in e]
    assert abs(min(stamps) / 1e6 - time.time()) < 600  # wall time, in µs

    from PIL import Image

    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (1400, 900)
        assert len(image.getcolors(1 << 20)) > 20  # lines, text, legend: not blank


@pytest.mark.parametrize(("status", "result"), [
    (4, "ok 1 selftests: sgx: run_epc_cg_selftests.sh # SKIP"),
    (3, "not ok 1 selftests: sgx: run_epc_cg_selftests.sh # exit=3"),
])
def test_tap_result_lines_and_a_missing_sibling(tmp_path, status, result):
    """Exit 4 is kselftest's SKIP; anything else non-zero is `not ok` with the status.
    The script runs ./ash_cgexec.sh, which is not beside it: a warning says so."""
    script = script_dir(tmp_path, f"#!/bin/sh\necho 'SKIP: or not'\necho oops >&2\n"
                                  f"[ -x ./ash_cgexec.sh ] && ./ash_cgexec.sh x true\n"
                                  f"exit {status}\n")
    run = selftest("--capacity", "16M", "--time-scale", "0", "--tap", str(script))
    assert run.returncode == status
    assert assert_tap13(run.stdout)[1:] == ["SKIP: or not", "oops"]  # stderr too, as 2>&1
    assert run.stdout.splitlines()[-1] == result
    assert (f"epcfs selftest: warning: the script runs ./ash_cgexec.sh, which is not in "
            f"{script.parent}") in run.stderr


def test_run_plot_without_trace(tmp_path):
    png = tmp_path / "run.png"
    result = subprocess.run(
        [*EPCFS, "run", "--capacity", "16M", "--time-scale", "0", "--plot", str(png), "--",
         "sh", "-c", "mkdir /sys/fs/cgroup/w && echo $$ > /sys/fs/cgroup/w/cgroup.procs && "
                     "epcfs load --size 4M --hold 0.5"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(Path("/tmp").glob(f"epcfs-trace-*{os.getpid()}*"))


def test_top_sees_a_running_selftest_fill_and_drain(tmp_path):
    """From outside the selftest's private mount namespace, `epcfs top -b` finds its
    daemon and shows its cgroup's EPC rise and fall back to 0."""
    script = script_dir(tmp_path, """#!/bin/sh
mkdir /sys/fs/cgroup/sgx_watch && echo $$ > /sys/fs/cgroup/sgx_watch/cgroup.procs
epcfs load --size 4M --hold 4
sleep 4
""")
    proc = subprocess.Popen([*EPCFS, "selftest", "--capacity", "16M", "--time-scale", "0",
                             str(script)], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while not (any(v.endswith("M") for v in seen) and seen[-1] == "0B"):
            assert time.monotonic() < deadline and proc.poll() is None, seen
            out = subprocess.run([*EPCFS, "top", "-b", "-n", "1", "--mountpoint",
                                  "/sys/fs/cgroup"], capture_output=True, text=True).stdout
            for frame in out.split("\n\n"):
                if "(private mount namespace)" in frame and "selftest" in frame:
                    rows = [line.split() for line in frame.splitlines()
                            if line.startswith("/sgx_watch ")]
                    if rows and seen[-1:] != rows[0][1:2]:
                        seen.append(rows[0][1])
            time.sleep(0.2)
        assert float(next(v for v in seen if v.endswith("M"))[:-1]) >= 4.0
    finally:
        assert proc.wait(60) == 0


def test_a_killed_daemon_leaves_a_readable_trace(mount_epcfs, tmp_path):
    trace = tmp_path / "t.json"
    daemon = mount_epcfs("--capacity", "8M", "--trace", str(trace))
    (daemon.path / "a").mkdir()
    (daemon.path / "a" / "misc.max").write_text("sgx_epc 65536\n")
    time.sleep(0.3)  # a few samples: flushed after each
    daemon.proc.kill()
    daemon.proc.wait()
    try:
        events = load(str(trace))
        assert {"misc.current /a", "misc.max /a"} <= {e["name"] for e in events}
        assert json.loads(trace.read_text() + "]") == events  # as the viewers read it
        assert not trace.read_text().rstrip().endswith("]")
    finally:
        for stale in Path(DAEMONS_DIR).glob(f"*-{daemon.proc.pid}.json"):
            stale.unlink()


def test_cgroup_kill_is_an_instant_per_member(mount_epcfs, tmp_path):
    trace = tmp_path / "t.json"
    daemon = mount_epcfs("--trace", str(trace))
    (daemon.path / "a").mkdir()
    sleepers = [subprocess.Popen(["sleep", "60"]) for _ in range(2)]
    try:
        for p in sleepers:
            (daemon.path / "a" / "cgroup.procs").write_text(f"{p.pid}\n")
        (daemon.path / "a" / "cgroup.kill").write_text("1\n")
        for p in sleepers:
            assert p.wait(timeout=10) == -9
    finally:
        for p in sleepers:
            p.kill()
            p.wait()
    assert daemon.stop() == 0
    kills = [e for e in load(str(trace)) if e["name"] == "kill"]
    assert sorted(e["tid"] for e in kills) == sorted(p.pid for p in sleepers)
    assert {e["args"]["cgroup"] for e in kills} == {"/a"}


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed")
def test_status_line_on_a_terminal_only(tmp_path):
    """On a terminal a live status line sits under the output while the script is quiet;
    it is gone at the end, and never reaches a pipe (the other tests' stdout)."""
    script = script_dir(tmp_path, """#!/bin/sh
mkdir /sys/fs/cgroup/quiet && echo $$ > /sys/fs/cgroup/quiet/cgroup.procs
echo "# Start holding"
epcfs load --size 4M --hold 6 >/dev/null
echo "PASS: held."
""")
    session, sock = f"epcfs-st-{os.getpid()}", str(tmp_path / "tmux.sock")
    tmux = ["tmux", "-S", sock]
    out = tmp_path / "status"
    command = (f"cd {REPO} && env -u COLUMNS -u LINES PATH={ENV['PATH']} "
               f"{' '.join(EPCFS)} selftest --capacity 16M --time-scale 0 {script}; "
               f"echo exit=$? > {out}; sleep 30")
    subprocess.run([*tmux, "new-session", "-d", "-s", session, "-x", "150", "-y", "20", command],
                   check=True)

    def screen() -> str:
        return subprocess.run([*tmux, "capture-pane", "-p", "-t", session],
                              capture_output=True, text=True).stdout

    try:
        deadline = time.monotonic() + 60
        while not re.search(r"epcfs selftest \d+:\d\d  \|  EPC quiet 4\.\dM  \|  \d+ processes",
                            screen()):
            assert time.monotonic() < deadline, screen()
            time.sleep(0.2)
        assert "# Start holding" in screen().splitlines()
        while not out.exists():
            assert time.monotonic() < deadline + 30, screen()
            time.sleep(0.2)
        assert out.read_text() == "exit=0\n"
        lines = screen().splitlines()
        assert lines.index("# Start holding") < lines.index("PASS: held.")
        assert "epcfs selftest " not in screen()  # the status line went with the run
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)


def test_an_unwritable_trace_or_plot_is_one_message(tmp_path):
    """No traceback: the daemon cannot start without its trace file; a figure that
    cannot be written is reported, and the command's status stands."""
    result = subprocess.run([*EPCFS, "run", "--capacity", "16M", "--trace",
                             str(tmp_path / "no" / "t.json"), "--", "true"],
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"--trace {tmp_path}/no/t.json: No such file or directory" in result.stderr
    assert "Traceback" not in result.stderr
    result = subprocess.run([*EPCFS, "run", "--capacity", "16M", "--time-scale", "0", "--plot",
                             str(tmp_path / "no" / "p.png"), "--", "sh", "-c", "exit 3"],
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=60)
    assert result.returncode == 3
    assert result.stderr == f"epcfs: --plot {tmp_path}/no/p.png: No such file or directory\n"


def test_a_background_child_holding_stdout_does_not_hold_the_run(tmp_path):
    """The script's exit ends the run, as without the output pump, though a child it
    left behind still has the pipe open."""
    script = script_dir(tmp_path, "#!/bin/sh\necho started\nsleep 10 2>/dev/null &\necho done\n")
    start = time.monotonic()
    result = selftest("--capacity", "16M", "--time-scale", "0", str(script), timeout=60)
    assert (result.returncode, result.stdout) == (0, "started\ndone\n")
    assert time.monotonic() - start < 8  # the child ends by itself at 10 s
