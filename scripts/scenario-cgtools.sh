#!/bin/bash
# The EPC cgroup scenario of scenario.sh, driven with Debian's cgroup-tools
# (cgcreate, cgset, cgexec, cgget, cgdelete) the way the bash selftests use them.
#
# Run it where /sys/fs/cgroup is epcfs:   epcfs run -- scripts/scenario-cgtools.sh
# (or, for the cgroup v1 layout:          epcfs run --cgroup-version 1 -- …)
# Environment: TEST_SGX (default: test_sgx on PATH).
set -u

# cgroup v1 iff /sys/fs/cgroup/misc is a directory, as the kernel's bash selftests decide
if [ -d /sys/fs/cgroup/misc ]; then v1=1; else v1=0; fi
echo "# cgroup v$((2 - v1)) layout"

top=epcfs_cgtools
test_sgx=${TEST_SGX:-test_sgx}
failures=0

pass() { echo "PASS: $*"; }
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }

# run_many CONTROLLERS:PATH COUNT: COUNT loads under cgexec; sets ok and failed.
run_many() {
    local pids=() pid
    for ((i = 0; i < $2; i++)); do
        cgexec -g "$1" "$test_sgx" -t unclobbered_vdso_oversubscribed >/dev/null 2>&1 &
        pids+=($!)
    done
    ok=0 failed=0
    for pid in "${pids[@]}"; do
        if wait "$pid"; then ok=$((ok + 1)); else failed=$((failed + 1)); fi
    done
}

clean_up() {
    cgdelete -r -g misc:$top
    ((v1 == 0)) || cgdelete -r -g memory:$top
}

value_of() { cgget -n -v -r "$1" "$2" | awk -v k="$3" '$1 == k { print $2 }'; }

capacity=$(value_of misc.capacity / sgx_epc)
if [ -z "$capacity" ]; then
    echo "FAIL: cgget cannot read misc.capacity (is epcfs mounted as cgroup2?)"
    exit 1
fi
small=$((capacity / 512)) large=$((capacity / 128))
echo "# EPC capacity $capacity bytes: limits small=$small large=$large larger=$capacity"

for cg in $top/small_parent/small $top/large $top/larger; do
    cgcreate -g "misc,memory:$cg" || { echo "FAIL: cgcreate $cg"; exit 1; }
done
cgset -r "misc.max=sgx_epc $small" $top/small_parent &&
    cgset -r "misc.max=sgx_epc $large" $top/large &&
    cgset -r "misc.max=sgx_epc $capacity" $top/larger ||
    { echo "FAIL: cgset misc.max"; clean_up; exit 1; }

run_many misc:$top/small_parent/small 1
((failed == 1)) && pass "a load fails under the small limit" ||
    fail "a load succeeded under the small limit"

run_many misc:$top/large 4
((ok >= 1)) && pass "4 loads under the large limit: $ok succeeded" ||
    fail "4 loads under the large limit: none succeeded"

run_many misc:$top/large 5
((failed >= 1)) && pass "5 loads under the large limit: $failed failed" ||
    fail "5 loads under the large limit: none failed"

run_many misc:$top/larger 8
((failed == 0)) && pass "8 loads under the larger limit all succeeded" ||
    fail "8 loads under the larger limit: $failed failed"

mem_limit=$((capacity - 2 * large))
if ((v1)); then
    cgset -r "memory.limit_in_bytes=$mem_limit" $top/large &&
        cgset -r "memory.memsw.limit_in_bytes=$mem_limit" $top/large
else
    cgset -r "memory.max=$mem_limit" $top/large
fi || fail "cannot set the memory limit"
run_many "memory,misc:$top/large" 4
((ok == 0)) && pass "4 loads with the memory limit below the backing store all failed" ||
    fail "memory limit below the backing store: $ok loads succeeded"

sleep 2
usage=$(value_of misc.current $top sgx_epc)
((usage == 0)) && pass "nothing left charged (misc.current 0)" ||
    fail "misc.current is $usage after every load ended"

clean_up
echo "# $failures failed"
((failures == 0))
