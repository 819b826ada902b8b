"""`epcfs`: one entry point, one module per subcommand.

Each subcommand module provides `add_arguments(parser)` and `run(args) -> int`; adding a
subcommand is adding a row to SUBCOMMANDS. Subcommand modules keep heavy imports
(pyfuse3, trio) inside run(), so building the parser stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = (
    # name, module, one-line help
    ("mount", "epcfs.service.daemon", "serve the cgroup filesystem at MOUNTPOINT"),
    ("run", "epcfs.tools.run", "run a command where /sys/fs/cgroup is epcfs"),
    ("selftest", "epcfs.tools.selftest", "run a kernel tree's run_epc_cg_selftests.sh unchanged"),
    ("load", "epcfs.tools.load", "hold an enclave of a given size in the current cgroup"),
    ("top", "epcfs.tools.top", "show the EPC per cgroup of every running daemon, like cgtop"),
    ("cdi", "epcfs.tools.cdi", "print a CDI spec giving containers the simulated SGX"),
    ("oci-hook", "epcfs.tools.oci_hook", "OCI hook (state on stdin): a container's own cgroup"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="epcfs",
        description="A cgroup v2 filesystem whose misc controller carries a simulated SGX EPC.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module, summary in SUBCOMMANDS:
        p = sub.add_parser(name, help=summary, description=summary)
        p.set_defaults(module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def _version() -> str:
    """The installed distribution's version (pyproject.toml's, via the editable install)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("epcfs")
    except PackageNotFoundError:
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return importlib.import_module(args.module).run(args)


if __name__ == "__main__":
    sys.exit(main())
