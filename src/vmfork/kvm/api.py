"""Thin, typed wrappers over the KVM ioctls. Each failure raises KvmError naming the ioctl and errno.

Calls go through libc's ioctl via ctypes (about 1 us) rather than fcntl.ioctl (about 4 us and a copy of the buffer):
the hot paths (fork, reset, the exit loop) pass preallocated structures by reference. ctypes releases the GIL
during the call, so KVM_RUN in one thread does not block the others."""

from __future__ import annotations

import ctypes
import errno as _errno
import mmap
import os
from typing import Final

from .._libc import libc as _libc
from .._libc import mmap as libc_mmap
from .._libc import munmap as libc_munmap
from ..errors import KvmError, KvmUnavailableError, VmforkError
from . import constants as c
from . import structs as s

_ioctl = _libc.ioctl
_ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
_ioctl.restype = ctypes.c_int

_NAMES: Final = {v: k for k, v in vars(c).items() if k.startswith("KVM_") and isinstance(v, int) and v > 0xFFFF}
_NAMES[c.KVM_RESET_DIRTY_RINGS] = "KVM_RESET_DIRTY_RINGS"


def ioctl(fd: int, request: int, arg: int | ctypes._CData | ctypes._Pointer[ctypes._CData] | None = None) -> int:  # type: ignore[name-defined]
    """Issue one ioctl; `arg` is an int, a ctypes object (passed by reference) or None."""
    if arg is None:
        ptr: int | object = None
    elif isinstance(arg, int):
        ptr = arg
    else:
        ptr = ctypes.byref(arg)  # type: ignore[arg-type]
    while True:
        ret = _ioctl(fd, request, ptr)
        if ret >= 0:
            return int(ret)
        err = ctypes.get_errno()
        if err != _errno.EINTR or request == c.KVM_RUN:
            raise KvmError(_NAMES.get(request, hex(request)), err)


IoctlPlan = list[tuple[int, object]]


def plan_entry(request: int, struct: ctypes.Structure) -> tuple[int, object]:
    """One step of an ioctl plan: a request and a pointer to a structure that outlives the plan."""
    return (request, ctypes.byref(struct))


def run_vcpu(vcpu_fd: int) -> int:
    """KVM_RUN on `vcpu_fd`. Returns 0, or -EINTR/-EAGAIN when a signal or immediate_exit interrupted it."""
    ret = _ioctl(vcpu_fd, c.KVM_RUN, None)
    if ret < 0:
        err = ctypes.get_errno()
        if err in (_errno.EINTR, _errno.EAGAIN):
            return -err
        raise KvmError("KVM_RUN", err)
    return 0


def run_plan(fd: int, plan: IoctlPlan) -> None:
    """Issue a prepared list of (request, pointer) ioctls on one fd: the restore hot path, with no per-call
    argument conversion."""
    call = _ioctl
    for request, ptr in plan:
        if call(fd, request, ptr) < 0:
            raise KvmError(_NAMES.get(request, hex(request)), ctypes.get_errno())


FdPlan = list[tuple[int, int, object]]


def run_fd_plan(plan: FdPlan) -> None:
    """Issue prepared (fd, request, pointer) ioctls, across several fds (a machine's vCPUs and VM), in order."""
    call = _ioctl
    for fd, request, ptr in plan:
        if call(fd, request, ptr) < 0:
            raise KvmError(_NAMES.get(request, hex(request)), ctypes.get_errno())


class Step(ctypes.Structure):
    """One ioctl of a PackedPlan (the layout vmfork._fastpath reads)."""

    _fields_ = [("fd", ctypes.c_int64), ("request", ctypes.c_uint64), ("arg", ctypes.c_uint64)]


class Copy(ctypes.Structure):
    """One memmove of an Entry (the layout vmfork._fastpath reads)."""

    _fields_ = [("dst", ctypes.c_uint64), ("src", ctypes.c_uint64), ("size", ctypes.c_uint64)]


class Piece(ctypes.Structure):
    """Where the next `size` bytes of an Entry's data go (a host address)."""

    _fields_ = [("dst", ctypes.c_uint64), ("size", ctypes.c_uint64)]


# VMFORK_FASTPATH=0 uses the Python loop even when the extension is built (for comparisons).
try:
    from .._fastpath import iterate as _c_iterate
    from .._fastpath import run_steps as _c_run_steps
except ImportError:         # not built (e.g. a source tree without `pip install`): the Python loop below
    _c_run_steps = _c_iterate = None
if os.environ.get("VMFORK_FASTPATH", "1") == "0":
    _c_run_steps = _c_iterate = None


class PackedPlan:
    """An FdPlan packed into an array of Steps, issued by one C call (vmfork._fastpath) when that module is built,
    else by the same loop as run_fd_plan. The structures the pointers point to must outlive the plan."""

    __slots__ = ("_addr", "_array", "_count", "_plan", "compiled")

    def __init__(self, plan: FdPlan, *, compiled: bool = True) -> None:
        self._plan = list(plan)
        self._count = len(self._plan)
        self._array = (Step * max(1, self._count))()
        for step, (fd, request, ptr) in zip(self._array, self._plan, strict=False):
            step.fd, step.request = fd, request
            step.arg = ctypes.cast(ptr, ctypes.c_void_p).value or 0  # type: ignore[call-overload, arg-type]
        self._addr = ctypes.addressof(self._array)
        self.compiled = compiled and _c_run_steps is not None

    def __len__(self) -> int:
        return self._count

    def run(self) -> None:
        if self.compiled:
            failed = _c_run_steps(self._addr, self._count)  # type: ignore[misc]
            if failed is not None:
                request = self._plan[failed[0]][1]
                raise KvmError(_NAMES.get(request, hex(request)), failed[1])
        else:
            run_fd_plan(self._plan)


class Entry:
    """A prepared way into the guest: memmoves (`copies`: (dst, src, size) host addresses), then the data of each
    call scattered over `pieces` ((host address, size), in order, as far as the data goes), then the ioctls of
    `plan`, then KVM_RUN on `vcpu_fd` (none when it is -1). `enter(data)` does it all in one C call
    (vmfork._fastpath.iterate, the GIL released once) when that module is built and `compiled`, else with the same
    steps in Python. The addresses and the plan's structures must outlive the entry. Returns what
    VcpuFd.run_once returns (0 without KVM_RUN)."""

    __slots__ = (
        "_copies",
        "_copy_list",
        "_ncopies",
        "_npieces",
        "_piece_list",
        "_pieces",
        "_plan",
        "compiled",
        "vcpu_fd",
    )

    def __init__(self, copies: list[tuple[int, int, int]], pieces: list[tuple[int, int]], plan: PackedPlan,
                 vcpu_fd: int, *, compiled: bool = True) -> None:
        self._copy_list = list(copies)
        self._piece_list = list(pieces)
        self._ncopies, self._npieces = len(copies), len(pieces)
        self._copies = (Copy * max(1, len(copies)))(*(Copy(*x) for x in copies))
        self._pieces = (Piece * max(1, len(pieces)))(*(Piece(*x) for x in pieces))
        self._plan = plan
        self.vcpu_fd = vcpu_fd
        self.compiled = compiled and _c_iterate is not None

    def enter(self, data: bytes) -> int:
        if self.compiled:
            plan = self._plan
            ret = _c_iterate(ctypes.addressof(self._copies), self._ncopies, data,  # type: ignore[misc]
                             ctypes.addressof(self._pieces), self._npieces, plan._addr, plan._count, self.vcpu_fd)
            if isinstance(ret, tuple):
                request = plan._plan[ret[0]][1]
                raise KvmError(_NAMES.get(request, hex(request)), ret[1])
            if ret < 0 and -ret not in (_errno.EINTR, _errno.EAGAIN):
                raise KvmError("KVM_RUN", -ret)
            return int(ret)
        move = ctypes.memmove
        for dst, src, size in self._copy_list:
            move(dst, src, size)
        pos, end = 0, len(data)
        for dst, size in self._piece_list:
            if pos >= end:
                break
            n = min(size, end - pos)
            move(dst, data[pos:pos + n], n)
            pos += n
        run_fd_plan(self._plan._plan)
        if self.vcpu_fd < 0:
            return 0
        return run_vcpu(self.vcpu_fd)


def fastpath_built() -> bool:
    """Whether vmfork._fastpath (the compiled ioctl loop) is available."""
    return _c_run_steps is not None


class Kvm:
    """/dev/kvm: capability queries and VM creation."""

    PATH = "/dev/kvm"

    def __init__(self, path: str = PATH) -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailableError(
                f"{path} does not exist: this host has no KVM (load kvm_intel or kvm_amd, or enable nested "
                "virtualisation for this VM)"
            ) from None
        except PermissionError:
            raise KvmUnavailableError(
                f"no permission to open {path}: run as root or add your user to the 'kvm' group "
                "(sudo usermod -aG kvm $USER, then log in again)"
            ) from None
        version = ioctl(self.fd, c.KVM_GET_API_VERSION)
        if version != 12:
            raise KvmUnavailableError(f"{path} speaks KVM API version {version}; vmfork needs 12")
        self.vcpu_mmap_size = ioctl(self.fd, c.KVM_GET_VCPU_MMAP_SIZE)
        self._caps: dict[int, int] = {}

    def check_extension(self, cap: int) -> int:
        if cap not in self._caps:
            self._caps[cap] = ioctl(self.fd, c.KVM_CHECK_EXTENSION, cap)
        return self._caps[cap]

    def supported_cpuid(self) -> ctypes.Structure:
        n = 256
        while True:
            buf = s.cpuid2_type(n)()
            buf.nent = n
            try:
                ioctl(self.fd, c.KVM_GET_SUPPORTED_CPUID, buf)
                return buf
            except KvmError as e:
                if e.errno != _errno.E2BIG:
                    raise
                n *= 2

    def _index_list(self, request: int) -> list[int]:
        n = 512
        while True:
            buf = s.msr_list_type(n)()
            buf.nmsrs = n
            try:
                ioctl(self.fd, request, buf)
                return list(buf.indices[: buf.nmsrs])
            except KvmError as e:
                if e.errno != _errno.E2BIG:
                    raise
                n = max(n * 2, int(buf.nmsrs))

    def msr_index_list(self) -> list[int]:
        return self._index_list(c.KVM_GET_MSR_INDEX_LIST)

    def msr_feature_index_list(self) -> list[int]:
        return self._index_list(c.KVM_GET_MSR_FEATURE_INDEX_LIST)

    def create_vm(self) -> VmFd:
        return VmFd(ioctl(self.fd, c.KVM_CREATE_VM, 0), self)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class VmFd:
    """A KVM VM file descriptor."""

    def __init__(self, fd: int, kvm: Kvm) -> None:
        self.fd = fd
        self.kvm = kvm
        self._region = s.UserspaceMemoryRegion()
        self._dirty = s.DirtyLog()
        self._irq = s.IrqLevel()
        self.dirty_ring_bytes = 0                   # per vCPU, once enable_dirty_ring() was called
        self.dirty_rings: list[DirtyRing] = []      # one per vCPU, in creation order

    def check_extension(self, cap: int) -> int:
        return ioctl(self.fd, c.KVM_CHECK_EXTENSION, cap)

    def enable_cap(self, cap: int, *args: int) -> None:
        ec = s.EnableCap()
        ec.cap = cap
        for i, a in enumerate(args):
            ec.args[i] = a
        ioctl(self.fd, c.KVM_ENABLE_CAP, ec)

    def enable_dirty_ring(self, nbytes: int) -> None:
        """Log dirty pages into per-vCPU rings of `nbytes` instead of per-slot bitmaps (before any vCPU exists).
        KVM_GET_DIRTY_LOG is refused from then on."""
        cap = c.KVM_CAP_DIRTY_LOG_RING_ACQ_REL
        if not self.check_extension(cap):
            cap = c.KVM_CAP_DIRTY_LOG_RING
        self.enable_cap(cap, nbytes)
        self.dirty_ring_bytes = nbytes

    def reset_dirty_rings(self) -> int:
        """Re-protect the pages of every ring entry marked harvested; returns how many."""
        ret = _ioctl(self.fd, c.KVM_RESET_DIRTY_RINGS, None)
        if ret < 0:
            raise KvmError("KVM_RESET_DIRTY_RINGS", ctypes.get_errno())
        return int(ret)

    def discard_dirty_rings(self) -> None:
        """Drop every logged page (a recycled VM starts with clean rings)."""
        if any([r.discard() for r in self.dirty_rings]):
            self.reset_dirty_rings()

    def set_tss_addr(self, addr: int) -> None:
        ioctl(self.fd, c.KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        ioctl(self.fd, c.KVM_SET_IDENTITY_MAP_ADDR, ctypes.c_uint64(addr))

    def create_irqchip(self) -> None:
        ioctl(self.fd, c.KVM_CREATE_IRQCHIP)

    def create_pit2(self) -> None:
        cfg = s.PitConfig()
        cfg.flags = c.KVM_PIT_SPEAKER_DUMMY
        ioctl(self.fd, c.KVM_CREATE_PIT2, cfg)

    def set_user_memory_region(self, slot: int, guest_phys_addr: int, size: int, userspace_addr: int,
                               flags: int = 0) -> None:
        r = self._region
        r.slot, r.flags, r.guest_phys_addr, r.memory_size, r.userspace_addr = (
            slot, flags, guest_phys_addr, size, userspace_addr)
        ioctl(self.fd, c.KVM_SET_USER_MEMORY_REGION, r)

    def get_dirty_log(self, slot: int, bitmap_addr: int) -> None:
        """Fill the bitmap at `bitmap_addr` (one bit per page) and clear the slot's log."""
        d = self._dirty
        d.slot = slot
        d.dirty_bitmap = bitmap_addr
        ioctl(self.fd, c.KVM_GET_DIRTY_LOG, d)

    def irq_line(self, irq: int, level: int) -> None:
        q = self._irq
        q.irq = irq
        q.level = level
        ioctl(self.fd, c.KVM_IRQ_LINE, q)

    def get_irqchip(self, chip: s.IrqChip) -> None:
        ioctl(self.fd, c.KVM_GET_IRQCHIP, chip)

    def set_irqchip(self, chip: s.IrqChip) -> None:
        ioctl(self.fd, c.KVM_SET_IRQCHIP, chip)

    def get_pit2(self, pit: s.PitState2) -> None:
        ioctl(self.fd, c.KVM_GET_PIT2, pit)

    def set_pit2(self, pit: s.PitState2) -> None:
        ioctl(self.fd, c.KVM_SET_PIT2, pit)

    def get_clock(self, clock: s.ClockData) -> None:
        ioctl(self.fd, c.KVM_GET_CLOCK, clock)

    def set_clock(self, clock: s.ClockData) -> None:
        ioctl(self.fd, c.KVM_SET_CLOCK, clock)

    def create_vcpu(self, index: int) -> VcpuFd:
        vcpu = VcpuFd(ioctl(self.fd, c.KVM_CREATE_VCPU, index), self)
        if vcpu.dirty_ring is not None:
            self.dirty_rings.append(vcpu.dirty_ring)
        return vcpu

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class VcpuFd:
    """A KVM vCPU file descriptor with its mmapped struct kvm_run (and its dirty ring, when the VM logs into rings).

    kvm_run and the dirty ring are one mapping of the vCPU fd (page 0 onwards through the ring's last page; the
    pages between them are never touched): with many VMs in a process every VMA costs each new VM's
    KVM_CREATE_VM, whose MMU-notifier registration locks every VMA of the process (mm_take_all_locks)."""

    def __init__(self, fd: int, vm: VmFd) -> None:
        self.fd = fd
        self.vm = vm
        run_size = vm.kvm.vcpu_mmap_size
        ring_offset = c.KVM_DIRTY_LOG_PAGE_OFFSET * mmap.PAGESIZE
        if vm.dirty_ring_bytes and run_size > ring_offset:
            raise KvmError("mmap(kvm_run)", _errno.EINVAL, f"kvm_run ({run_size} bytes) overlaps the dirty ring")
        self._map_size = ring_offset + vm.dirty_ring_bytes if vm.dirty_ring_bytes else run_size
        try:
            self.run_addr = libc_mmap(0, self._map_size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
        except VmforkError as e:
            os.close(fd)
            raise KvmError("mmap(kvm_run)", ctypes.get_errno(), str(e)) from None
        self.run = s.Run.from_address(self.run_addr)
        self.dirty_ring: DirtyRing | None = None
        if vm.dirty_ring_bytes:
            self.dirty_ring = DirtyRing(self.run_addr + ring_offset, vm.dirty_ring_bytes)

    # The get/set pairs take caller-owned structures so hot paths reuse their buffers.
    def get_regs(self, regs: s.Regs) -> None:
        ioctl(self.fd, c.KVM_GET_REGS, regs)

    def set_regs(self, regs: s.Regs) -> None:
        ioctl(self.fd, c.KVM_SET_REGS, regs)

    def get_sregs(self, sregs: s.Sregs) -> None:
        ioctl(self.fd, c.KVM_GET_SREGS, sregs)

    def set_sregs(self, sregs: s.Sregs) -> None:
        ioctl(self.fd, c.KVM_SET_SREGS, sregs)

    def get_fpu(self, fpu: s.Fpu) -> None:
        ioctl(self.fd, c.KVM_GET_FPU, fpu)

    def set_fpu(self, fpu: s.Fpu) -> None:
        ioctl(self.fd, c.KVM_SET_FPU, fpu)

    def get_xsave(self, xsave: ctypes.Structure) -> None:
        req = c.KVM_GET_XSAVE2 if ctypes.sizeof(xsave) > 4096 else c.KVM_GET_XSAVE
        ioctl(self.fd, req, xsave)

    def set_xsave(self, xsave: ctypes.Structure) -> None:
        ioctl(self.fd, c.KVM_SET_XSAVE, xsave)

    def get_xcrs(self, xcrs: s.Xcrs) -> None:
        ioctl(self.fd, c.KVM_GET_XCRS, xcrs)

    def set_xcrs(self, xcrs: s.Xcrs) -> None:
        ioctl(self.fd, c.KVM_SET_XCRS, xcrs)

    def get_msrs(self, msrs: ctypes.Structure) -> int:
        """Read the MSRs listed in msrs.entries[:nmsrs]; returns how many were read."""
        return ioctl(self.fd, c.KVM_GET_MSRS, msrs)

    def set_msrs(self, msrs: ctypes.Structure) -> int:
        return ioctl(self.fd, c.KVM_SET_MSRS, msrs)

    def get_lapic(self, lapic: s.LapicState) -> None:
        ioctl(self.fd, c.KVM_GET_LAPIC, lapic)

    def set_lapic(self, lapic: s.LapicState) -> None:
        ioctl(self.fd, c.KVM_SET_LAPIC, lapic)

    def get_vcpu_events(self, events: s.VcpuEvents) -> None:
        ioctl(self.fd, c.KVM_GET_VCPU_EVENTS, events)

    def set_vcpu_events(self, events: s.VcpuEvents) -> None:
        ioctl(self.fd, c.KVM_SET_VCPU_EVENTS, events)

    def get_mp_state(self, mp: s.MpState) -> None:
        ioctl(self.fd, c.KVM_GET_MP_STATE, mp)

    def set_mp_state(self, mp: s.MpState) -> None:
        ioctl(self.fd, c.KVM_SET_MP_STATE, mp)

    def get_debugregs(self, dr: s.DebugRegs) -> None:
        ioctl(self.fd, c.KVM_GET_DEBUGREGS, dr)

    def set_debugregs(self, dr: s.DebugRegs) -> None:
        ioctl(self.fd, c.KVM_SET_DEBUGREGS, dr)

    def set_cpuid2(self, cpuid: ctypes.Structure) -> None:
        ioctl(self.fd, c.KVM_SET_CPUID2, cpuid)

    def set_guest_debug(self, dbg: s.GuestDebug) -> None:
        ioctl(self.fd, c.KVM_SET_GUEST_DEBUG, dbg)

    def translate(self, linear: int) -> s.Translation:
        t = s.Translation()
        t.linear_address = linear
        ioctl(self.fd, c.KVM_TRANSLATE, t)
        return t

    def get_tsc_khz(self) -> int:
        return ioctl(self.fd, c.KVM_GET_TSC_KHZ)

    def run_once(self) -> int:
        """KVM_RUN. Returns 0, or -EINTR when a signal or immediate_exit interrupted it."""
        return run_vcpu(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            if self.dirty_ring is not None:
                if self.dirty_ring in self.vm.dirty_rings:
                    self.vm.dirty_rings.remove(self.dirty_ring)
                self.dirty_ring.close()
            libc_munmap(self.run_addr, self._map_size)
            os.close(self.fd)
            self.fd = -1


class DirtyRing:
    """A vCPU's dirty ring, mapped from its fd: `entries` struct kvm_dirty_gfn, a power of two. KVM produces
    entries with flags = DIRTY; the consumer reads them in order from `fetch`, marks each RESET, and calls
    VmFd.reset_dirty_rings() so KVM write-protects those pages again and reuses the entries.

    `words` views the ring as u64 pairs: [2i] = flags | slot << 32, [2i+1] = page offset in the slot. On x86 plain
    loads and stores give the acquire/release order the protocol asks for."""

    ENTRY_SIZE: Final = ctypes.sizeof(s.DirtyGfn)

    def __init__(self, addr: int, nbytes: int) -> None:
        """`addr`: where the ring is mapped (VcpuFd maps it with kvm_run and unmaps it)."""
        self.nbytes = nbytes
        self.entries = nbytes // self.ENTRY_SIZE
        self.mask = self.entries - 1
        self.fetch = 0                  # the next entry to read (a free-running count)
        self.addr = addr
        self._array = (ctypes.c_uint64 * (2 * self.entries)).from_address(self.addr)
        self.words = memoryview(self._array).cast("B").cast("Q")

    def discard(self) -> int:
        """Mark every pending entry harvested without reporting it; returns how many."""
        q, mask, f = self.words, self.mask, self.fetch
        start = f
        while True:
            j = (f & mask) << 1
            w = q[j]
            if not w & c.KVM_DIRTY_GFN_F_DIRTY:
                break
            q[j] = w ^ (c.KVM_DIRTY_GFN_F_DIRTY | c.KVM_DIRTY_GFN_F_RESET)
            f += 1
        self.fetch = f
        return f - start

    def close(self) -> None:
        """Drop the views of the ring (its vCPU unmaps it)."""
        if self.addr:
            self.words.release()
            self.addr = 0
