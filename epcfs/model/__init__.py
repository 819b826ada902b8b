"""The pure model: cgroup hierarchy, misc and memory accounting, and the SGX EPC.

Synchronous and free of I/O: every operation completes or raises KernelError having
changed nothing, so the fs, the reclaimer tasks and the enclave server share one object.
"""
