"""Kernel constants, each defined once, named as the kernel names them.

Values follow the final SGX EPC cgroup series (v17) and upstream arch/x86/kernel/cpu/sgx.
"""

from enum import IntEnum

PAGE_SIZE = 4096
"""Every EPC page and every misc `sgx_epc` charge is exactly one x86 page."""

U64_MAX = (1 << 64) - 1
"""misc.max's "max": the limit is stored as U64_MAX and printed as the word."""

INT_MAX = (1 << 31) - 1
"""cgroup.max.depth / max.descendants are ints; INT_MAX prints as "max"."""

PAGE_COUNTER_MAX = (1 << 63) // PAGE_SIZE - 1
"""memcg's page counter ceiling (LONG_MAX / PAGE_SIZE pages): memory.max's "max"."""

SGX_NR_TO_SCAN = 16
"""Pages one reclaim batch isolates from an LRU head: bounds the time the LRU lock is held."""

SGX_NR_LOW_PAGES = 32
"""Free-page floor: below it an allocation wakes ksgxd and direct reclaim runs globally."""

SGX_NR_HIGH_PAGES = 64
"""ksgxd reclaims until this many pages are free again (its wake-up watermark)."""

SGX_VA_SLOT_COUNT = 512
"""8-byte version slots in one 4 KiB VA page: one slot per evicted page (SECS takes one)."""

SGX_CG_MIN_FREE_PAGE = SGX_NR_LOW_PAGES
"""Headroom below a cgroup's limit that async reclaim tries to keep free."""

SGX_CG_LOW_LIMIT = SGX_CG_MIN_FREE_PAGE * 4
"""Limits at or below this many pages are too small to keep the headroom (no -32)."""

SGX_MAX_EPC_SECTIONS = 8
"""CPUID 0x12 enumerates at most this many EPC sections."""

SGX_EEXTEND_BLOCK_SIZE = 256
"""EEXTEND measures 256 bytes per call: 16 calls per measured page."""

PCMD_SIZE = 128
"""Paging crypto metadata per evicted page, stored in the backing file after the contents."""

PCMDS_PER_PAGE = PAGE_SIZE // PCMD_SIZE
"""32 evicted pages share one backing page of PCMD."""

SGX_EPC = "sgx_epc"
"""The misc resource name EPC pages are charged to (MISC_CG_RES_SGX_EPC)."""

SGX_EEXTENDS_PER_PAGE = PAGE_SIZE // SGX_EEXTEND_BLOCK_SIZE
"""EEXTEND leaves one measured page costs (16)."""

PCMD_FIRST_MASK = PCMDS_PER_PAGE - 1
"""Page indices that share a PCMD page differ only in these low bits (the kernel's mask)."""


class SgxPageType(IntEnum):
    """EPCM page types (enum sgx_page_type): what a page is to the hardware."""

    SECS = 0
    TCS = 1
    REG = 2
    VA = 3
    TRIM = 4

ADD_CHUNK = 512
"""Pages one step of ADD_PAGES adds at most (not a kernel constant: the model's step
size). The kernel checks for signals and reschedules between pages; one step per page
would make a load O(pages), so a step takes up to this many in bulk. It bounds how long
a step holds the daemon's loop and spreads a load's cost over time as the kernel's does,
which keeps the selftests' races (loads overlapping) as on hardware."""
