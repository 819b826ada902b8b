"""The pure model: cgroup hierarchy, misc and memory accounting, and the SGX EPC.

Synchronous and free of I/O: every operation completes or raises KernelError having
changed nothing, so the fs, the reclaimer tasks and the enclave server share one object.
"""

from .cgroup import Cgroup, Hierarchy
from .constants import SgxPageType
from .enclave import Enclave, Vepc
from .errors import Blocked, KernelError
from .reclaim import Batch, Round
from .sgx import Fault, Sgx

__all__ = ["Batch", "Blocked", "Cgroup", "Enclave", "Fault", "Hierarchy", "KernelError",
           "Round", "Sgx", "SgxPageType", "Vepc"]
