"""The EPC cgroup scenario end to end, as a user runs it: `epcfs run -- scripts/…`.

Everything is real: the daemon, its mount at /sys/fs/cgroup in a private mount
namespace, the scripts' shell, Debian's cgroup-tools, our test_sgx processes. The
capacity is small to keep CI short; the time scale stays at its default, because the
scenarios' outcomes depend on the races the timing model preserves (at scale 0 a
failed load would not release its pages before its neighbours hit the same wall).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

CAPACITY = "16M"
"""Small enough for CI; the scripts derive every limit from it."""

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount namespaces)")


def epcfs_at_cgroup_root() -> list[str]:
    """epcfs mounts at /sys/fs/cgroup visible here: `epcfs run` must never leave one."""
    with open("/proc/self/mounts") as f:
        return [line for line in f
                if line.split()[1] == "/sys/fs/cgroup" and "epcfs" in line.split()[2]]


def epcfs_run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    return subprocess.run([sys.executable, "-m", "epcfs.cli", "run", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(("script", "version"), [("scenario.sh", "2"),
                                                 ("scenario-cgtools.sh", "2"),
                                                 ("scenario-cgtools.sh", "1")])
def test_scenario_passes_and_leaves_nothing(script, version):
    """Version 1: the cgroup v1 layout (separate misc and memory hierarchies), which the
    cgroup-tools script detects as the kernel's bash selftests do."""
    if script.endswith("cgtools.sh") and not shutil.which("cgcreate"):
        pytest.skip("cgroup-tools not installed")
    result = epcfs_run("--capacity", CAPACITY, "--cgroup-version", version, "--",
                       f"scripts/{script}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAIL" not in result.stdout
    assert result.stdout.count("PASS:") >= 6
    assert "nothing left charged" in result.stdout
    if script.endswith("cgtools.sh"):
        assert f"# cgroup v{version} layout" in result.stdout
    assert not epcfs_at_cgroup_root()


def test_run_shows_epcfs_as_cgroup2_and_returns_the_command_status():
    result = epcfs_run("--capacity", CAPACITY, "--time-scale", "0", "--", "sh", "-c",
                       "grep ' /sys/fs/cgroup ' /proc/mounts; "
                       "cat /sys/fs/cgroup/misc.capacity; exit 7")
    assert result.returncode == 7
    assert result.stdout == ("cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime 0 0\n"
                             "sgx_epc 16777216\n")
    assert not epcfs_at_cgroup_root()  # the host never saw it


def test_run_v1_shows_the_v1_layout_in_proc_mounts_and_proc_cgroups():
    result = epcfs_run("--capacity", CAPACITY, "--time-scale", "0", "--cgroup-version", "1",
                       "--", "sh", "-c",
                       "grep ' /sys/fs/cgroup' /proc/mounts; cat /proc/cgroups; "
                       "cat /sys/fs/cgroup/misc/misc.capacity; ls /sys/fs/cgroup")
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        "tmpfs /sys/fs/cgroup tmpfs ro,nosuid,nodev,noexec,mode=755 0 0\n"
        "cgroup /sys/fs/cgroup/misc cgroup rw,nosuid,nodev,noexec,relatime,misc 0 0\n"
        "cgroup /sys/fs/cgroup/memory cgroup rw,nosuid,nodev,noexec,relatime,memory 0 0\n"
        "#subsys_name\thierarchy\tnum_cgroups\tenabled\nmemory\t1\t1\t1\nmisc\t2\t1\t1\n"
        "sgx_epc 16777216\nmemory\nmisc\n")
    assert not epcfs_at_cgroup_root()


def test_selftest_runs_a_kernel_style_script_unchanged(tmp_path):
    """`epcfs selftest` gives the script its siblings, our ./test_sgx, and stand-ins for
    swapoff/swapon, and returns its status. The script here is ours, shaped like the
    kernel's: it reads misc.capacity, moves itself with a sibling helper, and runs
    ./test_sgx under a limit that cannot hold the VA pages."""
    (tmp_path / "enter_cg.sh").write_text(
        '#!/bin/sh\necho 0 > "/sys/fs/cgroup/$1/cgroup.procs" && shift && exec "$@"\n')
    script = tmp_path / "run_epc_cg_selftests.sh"
    script.write_text("""#!/bin/sh
cap=$(awk '$1 == "sgx_epc" { print $2 }' /sys/fs/cgroup/misc.capacity)
mkdir /sys/fs/cgroup/t && echo "sgx_epc $((cap / 512))" > /sys/fs/cgroup/t/misc.max || exit 1
swapoff -a || exit 2
if sh ./enter_cg.sh t ./test_sgx -t unclobbered_vdso_oversubscribed >/dev/null 2>&1; then
    echo "FAIL: loaded under a tiny limit"; exit 1
fi
if ! sh ./enter_cg.sh t ./test_sgx -t unclobbered_vdso >/dev/null 2>&1; then
    echo "FAIL: small enclave"; exit 1
fi
echo PASS; exit 3
""")
    script.chmod(0o755)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    result = subprocess.run(
        [sys.executable, "-m", "epcfs.cli", "selftest", "--capacity", CAPACITY,
         "--time-scale", "0", str(script)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stdout) == (3, "PASS\n"), result.stderr
