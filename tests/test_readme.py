"""The README's commands work as written: every ```sh block runs, in order within its
section, as root from the top of the clone after the README's own `. .venv/bin/activate`,
in a private mount namespace with fresh tmpfs on /tmp and /run/epcfs (so /tmp/cg and the
default sockets are this test's alone). A block preceded by `<!-- not run: why -->` is
skipped; every other one must exit 0 without a traceback."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
TIMEOUT = 120.0
"""Seconds a block may take: the longest runs a daemon and a 5 s `epcfs load` hold."""

def sections() -> dict[str, list[tuple[str, str | None]]]:
    """Heading -> its ```sh blocks in order, as (code, why-not-run or None). Line by line:
    a `# comment` inside a block is not a heading."""
    out: dict[str, list[tuple[str, str | None]]] = {}
    heading, fence, why, code = "", None, None, []
    for line in README.read_text().splitlines():
        if fence is not None:
            if line.startswith("```"):
                if fence == "sh":
                    out.setdefault(heading, []).append(("\n".join(code) + "\n", why))
                fence, why, code = None, None, []
            else:
                code.append(line)
        elif line.startswith("```"):
            fence = line[3:].strip()
        elif line.startswith("#"):
            heading = line
        else:
            marker = re.fullmatch(r"<!-- (not run[^>]*)-->", line.strip())
            why = marker.group(1) if marker else (why if not line.strip() else None)
    return out


RUNNABLE = {h: blocks for h, blocks in sections().items() if any(not w for _, w in blocks)}


def test_the_readme_has_runnable_blocks_and_says_why_others_are_not():
    assert "## Mounting by hand" in RUNNABLE
    for blocks in sections().values():
        for _, why in blocks:
            assert why is None or why.strip() != "not run", "a `not run` needs a reason"


@pytest.mark.parametrize("heading", sorted(RUNNABLE))
def test_readme_section_runs_as_written(heading):
    code = "\n".join(c for c, why in RUNNABLE[heading] if not why)
    # The clone may itself live under /tmp (CI's may): the shell's working directory
    # keeps the clone reachable under the tmpfs, and is bound back at its own path.
    script = (f"set -e\ncd {REPO}\nmount -t tmpfs readme-tmp /tmp\n"
              f"mkdir -p {REPO}\nmount --no-canonicalize --bind /proc/self/cwd {REPO}\ncd {REPO}\n"
              "mkdir -p /run/epcfs\nmount -t tmpfs readme-run /run/epcfs\n"
              ". .venv/bin/activate\n" + code)
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                             script], capture_output=True, text=True, timeout=TIMEOUT,
                            stdin=subprocess.DEVNULL)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Traceback" not in output and "not found" not in output, output
