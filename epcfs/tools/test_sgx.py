"""`test_sgx`: a drop-in for the kernel's SGX selftest binary, driving the simulated EPC.

    ./test_sgx -t unclobbered_vdso_oversubscribed

runs like tools/testing/selftests/sgx/test_sgx on SGX hardware — same options, same
TAP/kselftest output, same exit codes, same process model — with the epcfs daemon in
place of /dev/sgx_enclave (its socket: $EPCFS_SOCKET, else the default for the daemon
behind /sys/fs/cgroup). Every test runs in a forked child that makes its own connection,
so the daemon charges the child's cgroup; no test_encl.elf is needed. See
epcfs/tools/sgx_selftest/ for the details.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Run as a program (signal dispositions are reset as for a C program); `argv`
    excludes the program name, which is taken from sys.argv[0]."""
    from .sgx_selftest.cases import FIXTURES
    from .sgx_selftest.harness import main as harness_main

    return harness_main(FIXTURES, argv)


if __name__ == "__main__":
    sys.exit(main())
