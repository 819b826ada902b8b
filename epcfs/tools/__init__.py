"""Stand-ins for user-space tools: the simulated test_sgx."""
