"""epcfs: /sys/fs/cgroup with a simulated SGX EPC behind the misc controller."""
