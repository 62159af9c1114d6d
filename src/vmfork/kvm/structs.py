"""The KVM x86-64 ABI structures, defined once as ctypes structures (sizes are checked against the C headers by
tests/test_kvm_abi.py)."""

from __future__ import annotations

import ctypes
import functools
from ctypes import c_int64, c_uint8, c_uint16, c_uint32, c_uint64


class Regs(ctypes.Structure):
    _fields_ = [
        (name, c_uint64)
        for name in (
            "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags",
        )
    ]


GPR_NAMES: tuple[str, ...] = tuple(f[0] for f in Regs._fields_)


class Segment(ctypes.Structure):
    _fields_ = [
        ("base", c_uint64), ("limit", c_uint32), ("selector", c_uint16), ("type", c_uint8),
        ("present", c_uint8), ("dpl", c_uint8), ("db", c_uint8), ("s", c_uint8), ("l", c_uint8),
        ("g", c_uint8), ("avl", c_uint8), ("unusable", c_uint8), ("padding", c_uint8),
    ]


class DTable(ctypes.Structure):
    _fields_ = [("base", c_uint64), ("limit", c_uint16), ("padding", c_uint16 * 3)]


SEGMENT_NAMES = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")


class Sregs(ctypes.Structure):
    _fields_ = [(name, Segment) for name in SEGMENT_NAMES] + [
        ("gdt", DTable), ("idt", DTable),
        ("cr0", c_uint64), ("cr2", c_uint64), ("cr3", c_uint64), ("cr4", c_uint64), ("cr8", c_uint64),
        ("efer", c_uint64), ("apic_base", c_uint64), ("interrupt_bitmap", c_uint64 * 4),
    ]


class Fpu(ctypes.Structure):
    _fields_ = [
        ("fpr", (c_uint8 * 16) * 8), ("fcw", c_uint16), ("fsw", c_uint16), ("ftwx", c_uint8), ("pad1", c_uint8),
        ("last_opcode", c_uint16), ("last_ip", c_uint64), ("last_dp", c_uint64), ("xmm", (c_uint8 * 16) * 16),
        ("mxcsr", c_uint32), ("pad2", c_uint32),
    ]


class MsrEntry(ctypes.Structure):
    _fields_ = [("index", c_uint32), ("reserved", c_uint32), ("data", c_uint64)]


class MsrsHeader(ctypes.Structure):
    _fields_ = [("nmsrs", c_uint32), ("pad", c_uint32)]


@functools.cache
def msrs_type(n: int) -> type[ctypes.Structure]:
    """struct kvm_msrs with room for n entries (one class per n: making a ctypes class costs about 10 µs, which a
    fork paid for every machine's syscall completion)."""

    class Msrs(ctypes.Structure):
        _fields_ = [("nmsrs", c_uint32), ("pad", c_uint32), ("entries", MsrEntry * n)]

    return Msrs


@functools.cache
def msr_list_type(n: int) -> type[ctypes.Structure]:
    class MsrList(ctypes.Structure):
        _fields_ = [("nmsrs", c_uint32), ("indices", c_uint32 * n)]

    return MsrList


class CpuidEntry2(ctypes.Structure):
    _fields_ = [
        ("function", c_uint32), ("index", c_uint32), ("flags", c_uint32),
        ("eax", c_uint32), ("ebx", c_uint32), ("ecx", c_uint32), ("edx", c_uint32), ("padding", c_uint32 * 3),
    ]


def cpuid2_type(n: int) -> type[ctypes.Structure]:
    class Cpuid2(ctypes.Structure):
        _fields_ = [("nent", c_uint32), ("padding", c_uint32), ("entries", CpuidEntry2 * n)]

    return Cpuid2


class _ExceptionEvent(ctypes.Structure):
    _fields_ = [("injected", c_uint8), ("nr", c_uint8), ("has_error_code", c_uint8), ("pending", c_uint8),
                ("error_code", c_uint32)]


class _InterruptEvent(ctypes.Structure):
    _fields_ = [("injected", c_uint8), ("nr", c_uint8), ("soft", c_uint8), ("shadow", c_uint8)]


class _NmiEvent(ctypes.Structure):
    _fields_ = [("injected", c_uint8), ("pending", c_uint8), ("masked", c_uint8), ("pad", c_uint8)]


class _SmiEvent(ctypes.Structure):
    _fields_ = [("smm", c_uint8), ("pending", c_uint8), ("smm_inside_nmi", c_uint8), ("latched_init", c_uint8)]


class VcpuEvents(ctypes.Structure):
    _fields_ = [
        ("exception", _ExceptionEvent), ("interrupt", _InterruptEvent), ("nmi", _NmiEvent),
        ("sipi_vector", c_uint32), ("flags", c_uint32), ("smi", _SmiEvent), ("triple_fault_pending", c_uint8),
        ("reserved", c_uint8 * 26), ("exception_has_payload", c_uint8), ("exception_payload", c_uint64),
    ]


class LapicState(ctypes.Structure):
    _fields_ = [("regs", c_uint8 * 1024)]


class MpState(ctypes.Structure):
    _fields_ = [("mp_state", c_uint32)]


class DebugRegs(ctypes.Structure):
    _fields_ = [("db", c_uint64 * 4), ("dr6", c_uint64), ("dr7", c_uint64), ("flags", c_uint64),
                ("reserved", c_uint64 * 9)]


class Xcr(ctypes.Structure):
    _fields_ = [("xcr", c_uint32), ("reserved", c_uint32), ("value", c_uint64)]


class Xcrs(ctypes.Structure):
    _fields_ = [("nr_xcrs", c_uint32), ("flags", c_uint32), ("xcrs", Xcr * 16), ("padding", c_uint64 * 16)]


@functools.cache
def xsave_type(size: int) -> type[ctypes.Structure]:
    """struct kvm_xsave; KVM_CAP_XSAVE2 may report more than the classic 4096 bytes. One class per size: every
    vCPU asks for it, and a new ctypes class per shell costs ~20 garbage-collected objects and their scans."""

    class Xsave(ctypes.Structure):
        _fields_ = [("region", c_uint32 * (max(size, 4096) // 4))]

    return Xsave


Xsave = xsave_type(4096)


class IrqChip(ctypes.Structure):
    """struct kvm_irqchip: chip_id 0 = PIC master, 1 = PIC slave, 2 = IOAPIC; the state is kept opaque."""

    _fields_ = [("chip_id", c_uint32), ("pad", c_uint32), ("data", c_uint8 * 512)]


class PitChannelState(ctypes.Structure):
    _fields_ = [
        ("count", c_uint32), ("latched_count", c_uint16), ("count_latched", c_uint8), ("status_latched", c_uint8),
        ("status", c_uint8), ("read_state", c_uint8), ("write_state", c_uint8), ("write_latch", c_uint8),
        ("rw_mode", c_uint8), ("mode", c_uint8), ("bcd", c_uint8), ("gate", c_uint8), ("count_load_time", c_int64),
    ]


class PitState2(ctypes.Structure):
    _fields_ = [("channels", PitChannelState * 3), ("flags", c_uint32), ("reserved", c_uint32 * 9)]


class PitConfig(ctypes.Structure):
    _fields_ = [("flags", c_uint32), ("pad", c_uint32 * 15)]


class ClockData(ctypes.Structure):
    _fields_ = [("clock", c_uint64), ("flags", c_uint32), ("pad0", c_uint32), ("realtime", c_uint64),
                ("host_tsc", c_uint64), ("pad", c_uint32 * 4)]


class UserspaceMemoryRegion(ctypes.Structure):
    _fields_ = [("slot", c_uint32), ("flags", c_uint32), ("guest_phys_addr", c_uint64), ("memory_size", c_uint64),
                ("userspace_addr", c_uint64)]


class DirtyLog(ctypes.Structure):
    _fields_ = [("slot", c_uint32), ("padding1", c_uint32), ("dirty_bitmap", c_uint64)]


class DirtyGfn(ctypes.Structure):
    """One entry of a vCPU's dirty ring (struct kvm_dirty_gfn)."""

    _fields_ = [("flags", c_uint32), ("slot", c_uint32), ("offset", c_uint64)]


class IrqLevel(ctypes.Structure):
    _fields_ = [("irq", c_uint32), ("level", c_uint32)]


class GuestDebug(ctypes.Structure):
    _fields_ = [("control", c_uint32), ("pad", c_uint32), ("debugreg", c_uint64 * 8)]


class EnableCap(ctypes.Structure):
    _fields_ = [("cap", c_uint32), ("flags", c_uint32), ("args", c_uint64 * 4), ("pad", c_uint8 * 64)]


class Translation(ctypes.Structure):
    _fields_ = [("linear_address", c_uint64), ("physical_address", c_uint64), ("valid", c_uint8),
                ("writeable", c_uint8), ("usermode", c_uint8), ("pad", c_uint8 * 5)]


class Interrupt(ctypes.Structure):
    _fields_ = [("irq", c_uint32)]


# --- struct kvm_run -----------------------------------------------------------------------------------------------

class ExitIo(ctypes.Structure):
    _fields_ = [("direction", c_uint8), ("size", c_uint8), ("port", c_uint16), ("count", c_uint32),
                ("data_offset", c_uint64)]


class ExitMmio(ctypes.Structure):
    _fields_ = [("phys_addr", c_uint64), ("data", c_uint8 * 8), ("len", c_uint32), ("is_write", c_uint8)]


class ExitInternal(ctypes.Structure):
    _fields_ = [("suberror", c_uint32), ("ndata", c_uint32), ("data", c_uint64 * 16)]


class ExitFailEntry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", c_uint64), ("cpu", c_uint32)]


class ExitSystemEvent(ctypes.Structure):
    _fields_ = [("type", c_uint32), ("ndata", c_uint32), ("data", c_uint64 * 16)]


class ExitDebug(ctypes.Structure):
    _fields_ = [("exception", c_uint32), ("pad", c_uint32), ("pc", c_uint64), ("dr6", c_uint64), ("dr7", c_uint64)]


class ExitException(ctypes.Structure):
    _fields_ = [("exception", c_uint32), ("error_code", c_uint32)]


class ExitMsr(ctypes.Structure):
    _fields_ = [("error", c_uint8), ("pad", c_uint8 * 7), ("reason", c_uint32), ("index", c_uint32),
                ("data", c_uint64)]


class ExitUnion(ctypes.Union):
    _fields_ = [
        ("io", ExitIo), ("mmio", ExitMmio), ("internal", ExitInternal), ("fail_entry", ExitFailEntry),
        ("system_event", ExitSystemEvent), ("debug", ExitDebug), ("ex", ExitException), ("msr", ExitMsr),
        ("hw_exit_reason", c_uint64), ("padding", c_uint8 * 256),
    ]


class SyncRegs(ctypes.Structure):
    _fields_ = [("regs", Regs), ("sregs", Sregs), ("events", VcpuEvents)]


class SyncRegsUnion(ctypes.Union):
    _fields_ = [("regs", SyncRegs), ("padding", c_uint8 * 2048)]


class Run(ctypes.Structure):
    _fields_ = [
        ("request_interrupt_window", c_uint8), ("immediate_exit", c_uint8), ("padding1", c_uint8 * 6),
        ("exit_reason", c_uint32), ("ready_for_interrupt_injection", c_uint8), ("if_flag", c_uint8),
        ("flags", c_uint16), ("cr8", c_uint64), ("apic_base", c_uint64), ("exit", ExitUnion),
        ("kvm_valid_regs", c_uint64), ("kvm_dirty_regs", c_uint64), ("s", SyncRegsUnion),
    ]
