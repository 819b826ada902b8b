"""bench/soak.py in short: a few seconds of mixed load (enclave builds and SIGKILLs in
several cgroups, reads of every file, mkdir/rmdir, limit writes) end with no error and
nothing charged. The RSS bound is the long run's business (README): over a few seconds
the daemon is still warming up, so it is not asserted here, and neither is any speed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_a_short_soak_has_no_errors_and_leaves_nothing_charged():
    result = subprocess.run(
        [sys.executable, str(REPO / "bench/soak.py"), "--seconds", "8", "--workers", "3",
         "--max-rss-growth", "1000"],
        capture_output=True, text=True, timeout=180, cwd=REPO, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "  errors         0\n" in result.stdout
    assert "  final usage    0\n" in result.stdout
    assert "traceback" not in result.stderr.lower()
