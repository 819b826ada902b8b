"""The trio side: the daemon, the reclaimers, the enclave server, process tracking."""
