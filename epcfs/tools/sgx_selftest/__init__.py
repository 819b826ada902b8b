"""The simulated SGX selftest behind the `test_sgx` console script.

- harness: the kselftest harness as test_sgx links it (options, TAP output, one forked
  child per test in its own process group, timeouts, the result lines and exit codes);
- encl: the selftest enclave (built-in test_encl.elf layout) and the CPU side of it —
  EENTER/ERESUME/EACCEPT as seen through the vDSO — over the epcfs enclave protocol;
- cases: the sixteen `enclave.*` tests, with the main.c line numbers their diagnostics carry.

Only the standard library is imported here (no trio, no pyfuse3): eight instances start
at once on small machines.
"""
