#!/bin/sh
# The EPC cgroup scenario, in POSIX sh with nothing but mkdir, echo and cat.
#
# Run it where /sys/fs/cgroup is epcfs:   epcfs run -- scripts/scenario.sh
# It checks what SGX EPC cgroup support promises (kernel-facts §5): with C the EPC
# capacity, a heap of C cannot load under C/512 (its VA pages alone exceed it); under
# C/128 four loads in parallel leave one succeeding and five leave one failing; under C
# eight all succeed, also with one of them killed; a memory.max too small for the EPC
# backing store makes every load fail; and at the end nothing is left charged.
#
# Environment: TEST_SGX (default: test_sgx on PATH), CGROUP (default /sys/fs/cgroup).
set -u

cgroot=${CGROUP:-/sys/fs/cgroup}
top=$cgroot/epcfs_scenario
test_sgx=${TEST_SGX:-test_sgx}
load="$test_sgx -t unclobbered_vdso_oversubscribed"
failures=0

say() { printf '%s\n' "$*"; }
pass() { say "PASS: $*"; }
fail() { say "FAIL: $*"; failures=$((failures + 1)); }

# Start one load inside cgroup $1 in the background; its pid is in $!.
start_in() {
    sh -c 'echo 0 > "$1/cgroup.procs" && shift && exec "$@"' sh "$top/$1" $load >/dev/null 2>&1 &
}

# Start $2 loads in cgroup $1 and wait for all; sets ok and failed to the counts.
run_many() {
    pids=""
    i=0
    while [ "$i" -lt "$2" ]; do
        start_in "$1"
        pids="$pids $!"
        i=$((i + 1))
    done
    wait_all $pids
}

wait_all() {
    ok=0
    failed=0
    for pid in "$@"; do
        if wait "$pid"; then ok=$((ok + 1)); else failed=$((failed + 1)); fi
    done
}

cleanup() {
    for cg in small_parent/small small_parent large larger; do
        [ -d "$top/$cg" ] && rmdir "$top/$cg"
    done
    [ -d "$top" ] && rmdir "$top"
}

capacity=$(awk '$1 == "sgx_epc" { print $2 }' "$cgroot/misc.capacity")
if [ -z "$capacity" ] || [ "$capacity" -eq 0 ]; then
    say "SKIP: no sgx_epc capacity in $cgroot/misc.capacity"
    exit 4
fi
small=$((capacity / 512))
large=$((capacity / 128))
say "# EPC capacity $capacity bytes: limits small=$small large=$large larger=$capacity"

mkdir "$top" "$top/small_parent" "$top/small_parent/small" "$top/large" "$top/larger" ||
    { say "FAIL: cannot create cgroups"; exit 1; }
if ! { echo "+misc +memory" > "$cgroot/cgroup.subtree_control" &&
       echo "+misc +memory" > "$top/cgroup.subtree_control" &&
       echo "+misc" > "$top/small_parent/cgroup.subtree_control" &&
       echo "sgx_epc $small" > "$top/small_parent/misc.max" &&
       echo "sgx_epc $large" > "$top/large/misc.max" &&
       echo "sgx_epc $capacity" > "$top/larger/misc.max"; }; then
    say "FAIL: cannot set up controllers and limits"
    cleanup
    exit 1
fi

run_many small_parent/small 1
if [ "$failed" -eq 1 ]; then pass "a load fails under the small limit"
else fail "a load succeeded under the small limit"; fi

run_many large 4
if [ "$ok" -ge 1 ]; then pass "4 loads under the large limit: $ok succeeded"
else fail "4 loads under the large limit: none succeeded"; fi

run_many large 5
if [ "$failed" -ge 1 ]; then pass "5 loads under the large limit: $failed failed"
else fail "5 loads under the large limit: none failed"; fi

run_many larger 8
if [ "$failed" -eq 0 ]; then pass "8 loads under the larger limit all succeeded"
else fail "8 loads under the larger limit: $failed failed"; fi

# Eight again, one of them killed 1-3 s in; the other seven must succeed.
pids=""
i=0
while [ "$i" -lt 8 ]; do start_in larger; pids="$pids $!"; i=$((i + 1)); done
victim=$(echo "$pids" | awk -v seed="$$" '{ srand(seed); print $(int(rand() * NF) + 1) }')
sleep $(awk -v seed="$$" 'BEGIN { srand(seed + 1); print int(rand() * 3) + 1 }')
kill "$victim" 2>/dev/null
say "# killed load $victim"
others=$(echo "$pids" | tr ' ' '\n' | grep -vx "$victim" | tr '\n' ' ')
wait "$victim" 2>/dev/null
wait_all $others
if [ "$failed" -eq 0 ]; then pass "8 loads under the larger limit, one killed: the other 7 succeeded"
else fail "8 loads under the larger limit, one killed: $failed others failed"; fi

# The backing store of evicted pages is charged to memory: leave it too little room.
echo $((capacity - 2 * large)) > "$top/large/memory.max"
run_many large 4
if [ "$ok" -eq 0 ]; then pass "4 loads with memory.max below the backing store all failed"
else fail "memory.max below the backing store: $ok loads succeeded"; fi
echo max > "$top/large/memory.max"

sleep 2
usage=$(awk '$1 == "sgx_epc" { print $2 }' "$top/misc.current")
memory=$(cat "$top/memory.current")
if [ "$usage" -eq 0 ] && [ "$memory" -eq 0 ]; then pass "nothing left charged (misc.current and memory.current 0)"
else fail "left charged: misc.current sgx_epc $usage, memory.current $memory"; fi

cleanup
say "# $failures failed"
[ "$failures" -eq 0 ]
