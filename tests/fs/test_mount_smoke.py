"""The daemon serves misc.capacity through a real mount."""

import subprocess


def test_capacity_reads_through_cat(mount_epcfs):
    d = mount_epcfs("--capacity", "64M")
    out = subprocess.run(["cat", str(d.path / "misc.capacity")], capture_output=True, text=True)
    assert out.stdout == "sgx_epc 67108864\n"
