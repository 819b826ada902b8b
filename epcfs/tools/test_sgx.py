"""`test_sgx`: a drop-in for the kernel's SGX selftest binary, driving the simulated EPC."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if "-h" in args or "--help" in args:
        print("Usage: test_sgx [-h|-l] [-t|-T|-v|-V|-f|-F|-r name]\n"
              "Simulated SGX selftest (epcfs). Not implemented yet.")
        return 0
    print("test_sgx: not implemented yet", file=sys.stderr)
    return 2
