"""Dropping every shadow translation KVM holds for a VM with one memory-slot operation: moving a one-page "flush
slot" between two guest-physical addresses the guest cannot reach.

Why a VM needs it: where KVM shadows the guest's page tables (kvm_pvm: guest kernel mode emulated), a fork reset that
copies parent pages back into pages the fork already owns rewrites guest page tables behind KVM's back (a host write
to an already private page reaches KVM neither through its write tracking nor through an MMU notifier), and the
shadow pages built from the old contents stay in use: a Linux fork's shell crashed after a reset.

How: moving or deleting any memory slot makes KVM drop every shadow page of the VM (kvm_arch_flush_shadow_memslot
runs kvm_mmu_zap_all_fast while KVM_X86_QUIRK_SLOT_ZAP_ALL is on, the default; vmfork never disables it). Moving the
flush slot (KVM_MR_MOVE: same slot, size and host address, another guest-physical address) is one ioctl with two
SRCU grace periods and a zap; the alternative, deleting and registering again every RAM slot, is two ioctls per slot
with three grace periods, and frees and reallocates the RAM slot's rmaps and dirty bitmap each time.
docs/benchmarks.md ("Dropping shadow translations at a Linux fork's reset") has both measured side by side.

Where: the last two pages below 2^52 (the architectural maximum of x86 physical addresses, and KVM's limit for a
slot where it shadows page tables): beyond the guest's physical address width (CPUID 0x80000008: 48 bits on this host)
no guest page-table entry, CR3 or emulated access can name them; they are in no e820 map, ACPI table or vmfork
memory image, and the slot is read-only, backed by one never-written anonymous page shared by every VM of the
process. Where KVM refuses the slot (a host with two-dimensional paging limits slots to the host's physical address
width; such hosts do not shadow page tables, so resets there never ask for the flush), `drop_translations` says so
and the caller falls back to re-registering its RAM slots.

The slot is registered in a VM the first time the VM needs a flush, so shells of every kind (pooled shells, process
fork workers, domains) get it without any change to how they are built, and a recycled shell keeps it.
"""

from __future__ import annotations

import mmap
import weakref

from . import _libc
from ._libc import MAP_NORESERVE
from .errors import KvmError
from .kvm import VmFd
from .kvm.constants import KVM_MEM_READONLY

PAGE_SIZE = 4096
# The highest slot id a VM may use (KVM_CAP_NR_MEMSLOTS is 32764 on x86); vmfork's RAM slots count up from 0.
FLUSH_SLOT = 32763
FLUSH_GPAS = ((1 << 52) - 2 * PAGE_SIZE, (1 << 52) - PAGE_SIZE)

_page = 0                                               # the slot's backing page (process-wide, made at first use)
_where: weakref.WeakKeyDictionary[VmFd, int] = weakref.WeakKeyDictionary()   # VM -> its flush slot's address now
_REFUSED = -1                                           # in _where: KVM refused this VM a flush slot


def _backing_page() -> int:
    global _page
    if not _page:
        _page = _libc.mmap(0, PAGE_SIZE, mmap.PROT_READ, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
    return _page


def drop_translations(vm: VmFd) -> bool:
    """Make KVM drop every shadow page table and translation it derived from `vm`'s guest memory (the vCPUs rebuild
    them from the guest's page tables as they run). False, having changed nothing, where KVM refuses the flush slot:
    the caller then needs another way (GuestMemory.reregister_slots)."""
    gpa = _where.get(vm)
    if gpa == _REFUSED:
        return False
    page = _backing_page()
    try:
        if gpa is None:         # first flush of this VM: register the slot (which drops nothing yet)
            gpa = FLUSH_GPAS[0]
            vm.set_user_memory_region(FLUSH_SLOT, gpa, PAGE_SIZE, page, KVM_MEM_READONLY)
        gpa = FLUSH_GPAS[1] if gpa == FLUSH_GPAS[0] else FLUSH_GPAS[0]
        vm.set_user_memory_region(FLUSH_SLOT, gpa, PAGE_SIZE, page, KVM_MEM_READONLY)
    except KvmError:            # KVM checks a slot change before making it: a refused one changed nothing
        _where[vm] = _REFUSED
        return False
    _where[vm] = gpa
    return True


__all__ = ["FLUSH_GPAS", "FLUSH_SLOT", "drop_translations"]
