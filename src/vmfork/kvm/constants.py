"""ioctl numbers, capabilities, exit reasons and flags of the KVM API (include/uapi/linux/kvm.h)."""

from __future__ import annotations

import ctypes

from . import structs as s

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _ior(nr: int, t: type) -> int:
    return _ioc(_IOC_READ, nr, ctypes.sizeof(t))


def _iow(nr: int, t: type) -> int:
    return _ioc(_IOC_WRITE, nr, ctypes.sizeof(t))


def _iowr(nr: int, t: type) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, ctypes.sizeof(t))


# /dev/kvm
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_GET_MSR_INDEX_LIST = _iowr(0x02, ctypes.c_uint32)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, ctypes.c_uint64)
KVM_GET_MSR_FEATURE_INDEX_LIST = _iowr(0x0A, ctypes.c_uint32)

# VM
KVM_CREATE_VCPU = _io(0x41)
KVM_GET_DIRTY_LOG = _iow(0x42, s.DirtyLog)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, s.UserspaceMemoryRegion)
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, ctypes.c_uint64)
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_IRQ_LINE = _iow(0x61, s.IrqLevel)
KVM_GET_IRQCHIP = _iowr(0x62, s.IrqChip)
KVM_SET_IRQCHIP = _ior(0x63, s.IrqChip)
KVM_CREATE_PIT2 = _iow(0x77, s.PitConfig)
KVM_SET_CLOCK = _iow(0x7B, s.ClockData)
KVM_GET_CLOCK = _ior(0x7C, s.ClockData)
KVM_GET_PIT2 = _ior(0x9F, s.PitState2)
KVM_SET_PIT2 = _iow(0xA0, s.PitState2)
KVM_ENABLE_CAP = _iow(0xA3, s.EnableCap)
KVM_RESET_DIRTY_RINGS = _io(0xC7)

# vCPU
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, s.Regs)
KVM_SET_REGS = _iow(0x82, s.Regs)
KVM_GET_SREGS = _ior(0x83, s.Sregs)
KVM_SET_SREGS = _iow(0x84, s.Sregs)
KVM_TRANSLATE = _iowr(0x85, s.Translation)
KVM_INTERRUPT = _iow(0x86, s.Interrupt)
KVM_GET_MSRS = _iowr(0x88, s.MsrsHeader)
KVM_SET_MSRS = _iow(0x89, s.MsrsHeader)
KVM_GET_FPU = _ior(0x8C, s.Fpu)
KVM_SET_FPU = _iow(0x8D, s.Fpu)
KVM_GET_LAPIC = _ior(0x8E, s.LapicState)
KVM_SET_LAPIC = _iow(0x8F, s.LapicState)
KVM_SET_CPUID2 = _iow(0x90, ctypes.c_uint64)
KVM_GET_CPUID2 = _iowr(0x91, ctypes.c_uint64)
KVM_GET_MP_STATE = _ior(0x98, s.MpState)
KVM_SET_MP_STATE = _iow(0x99, s.MpState)
KVM_SET_GUEST_DEBUG = _iow(0x9B, s.GuestDebug)
KVM_GET_VCPU_EVENTS = _ior(0x9F, s.VcpuEvents)
KVM_SET_VCPU_EVENTS = _iow(0xA0, s.VcpuEvents)
KVM_GET_STATS_FD = _io(0xCE)        # a vCPU's (or VM's) binary statistics file (KVM_CAP_BINARY_STATS_FD)
KVM_GET_DEBUGREGS = _ior(0xA1, s.DebugRegs)
KVM_SET_DEBUGREGS = _iow(0xA2, s.DebugRegs)
KVM_GET_XSAVE = _ior(0xA4, s.Xsave)
KVM_SET_XSAVE = _iow(0xA5, s.Xsave)
KVM_GET_XCRS = _ior(0xA6, s.Xcrs)
KVM_SET_XCRS = _iow(0xA7, s.Xcrs)
KVM_SET_TSC_KHZ = _io(0xA2)
KVM_GET_TSC_KHZ = _io(0xA3)
KVM_GET_XSAVE2 = _ior(0xCF, s.Xsave)

# capabilities
KVM_CAP_IRQCHIP = 0
KVM_CAP_HLT = 1
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_PIT2 = 33
KVM_CAP_PIT_STATE2 = 35
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_ADJUST_CLOCK = 39
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_DEBUGREGS = 50
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_SET_GUEST_DEBUG = 23
KVM_CAP_TSC_CONTROL = 60
KVM_CAP_GET_TSC_KHZ = 61
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_SYNC_REGS = 74
KVM_CAP_READONLY_MEM = 81
KVM_CAP_GUEST_DEBUG_HW_BPS = 119
KVM_CAP_X2APIC_API = 129
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_GET_MSR_FEATURES = 153
KVM_CAP_EXCEPTION_PAYLOAD = 164
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_CAP_X86_USER_SPACE_MSR = 188
KVM_CAP_DIRTY_LOG_RING = 192
KVM_CAP_BINARY_STATS_FD = 203
KVM_CAP_SET_GUEST_DEBUG2 = 195     # the KVM_GUESTDBG_* flags this KVM accepts
KVM_CAP_XSAVE2 = 208
KVM_CAP_X86_TRIPLE_FAULT_EVENT = 218
KVM_CAP_DIRTY_LOG_RING_ACQ_REL = 223

# exit reasons
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_NMI = 16
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_X86_RDMSR = 29
KVM_EXIT_X86_WRMSR = 30
KVM_EXIT_DIRTY_RING_FULL = 31

EXIT_REASON_NAMES = {v: k[len("KVM_EXIT_"):].lower() for k, v in dict(globals()).items() if k.startswith("KVM_EXIT_")}

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_SIMUL_EX = 2
KVM_INTERNAL_ERROR_DELIVERY_EV = 3

KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3

# memory slot flags
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0

# dirty ring (KVM_CAP_DIRTY_LOG_RING): per-vCPU rings of struct kvm_dirty_gfn, mmapped from the vCPU fd
KVM_DIRTY_LOG_PAGE_OFFSET = 64          # in pages (x86)
KVM_DIRTY_GFN_F_DIRTY = 1 << 0          # set by KVM: the entry names a page written since it was last reset
KVM_DIRTY_GFN_F_RESET = 1 << 1          # set by user space: harvested, re-protect at KVM_RESET_DIRTY_RINGS
KVM_MEM_READONLY = 1 << 1

# sync regs
KVM_SYNC_X86_REGS = 1 << 0
KVM_SYNC_X86_SREGS = 1 << 1
KVM_SYNC_X86_EVENTS = 1 << 2

# vcpu events flags
KVM_VCPUEVENT_VALID_NMI_PENDING = 0x1
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x2
KVM_VCPUEVENT_VALID_SHADOW = 0x4
KVM_VCPUEVENT_VALID_SMM = 0x8
KVM_VCPUEVENT_VALID_PAYLOAD = 0x10
KVM_VCPUEVENT_VALID_TRIPLE_FAULT = 0x20

# guest debug
KVM_GUESTDBG_ENABLE = 0x1
KVM_GUESTDBG_SINGLESTEP = 0x2
KVM_GUESTDBG_USE_SW_BP = 0x10000
KVM_GUESTDBG_USE_HW_BP = 0x20000
KVM_GUESTDBG_INJECT_DB = 0x40000
KVM_GUESTDBG_INJECT_BP = 0x80000
KVM_GUESTDBG_BLOCKIRQ = 0x100000

# mp states
KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3

# irqchip ids
KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2

KVM_PIT_SPEAKER_DUMMY = 1
KVM_CLOCK_TSC_STABLE = 2

# cpuid entry flags
KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1
