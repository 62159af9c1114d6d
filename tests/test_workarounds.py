"""Host workarounds (vmfork.workarounds) with guests that follow none of vmfork's conventions.

The syscall guest (guests/syscallguest/main.asm) is a PVH kernel with its own GDT, TSS (IST1), IDT and page tables,
a supervisor-only page holding its entry points, STAR/LSTAR/SFMASK unlike Linux's, and a user program making 100
system calls (returning by sysretq and iretq alternately), then a user read of a supervisor page and a user `jmp` to
LSTAR with IF set (both must reach the guest's own #PF handler), then an exit system call. On a host where kernel
mode runs natively everything happens in hardware and the counts are zero; where it is emulated (kvm_pvm) the int3
fallback delivers the kernel's int3 and the syscall completion enters each system call in kernel mode."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from vmfork.arch.x86 import flat
from vmfork.fork import VM, kernel_mode_emulated
from vmfork.snapshot import savefile
from vmfork.vm import Machine
from vmfork.workarounds import CATALOG
from vmfork.workarounds.syscall_probe import stays_in_user_mode

RESULTS = 0x105800
DONE = 0x2A
INT3_ADDR_FIELD = 7


def _results(vm: VM) -> dict[str, int]:
    names = ("bp_rsp", "bp_rip", "bp_cs", "bp_rflags", "bp_rsp_old", "bp_ss", "bp_flags_in", "int3_addr",
             "syscalls", "user_pf", "last_pf_err", "last_pf_cr2", "sysrets", "irets", "entry_cpl", "entry_flags")
    return dict(zip(names, struct.unpack("<16Q", vm.memory.read(RESULTS, 128)), strict=True))


@pytest.fixture(scope="module")
def syscall_guest(guest_dir: Path) -> Path:
    return guest_dir / "syscallguest.elf"


def _boot_to_marker(path: Path) -> VM:
    vm = VM.create(memory_mib=16, name="syscallguest")
    assert vm.load_kernel(path) == "pvh"
    ev = vm.run(timeout=20)
    assert ev.reason == "harness-start", ev
    return vm


def _check_user_phase(vm: VM, ev: object) -> None:
    assert getattr(ev, "reason", None) == "exit" and getattr(ev, "status", None) == DONE, (ev, _results(vm))
    r = _results(vm)
    assert r["syscalls"] == 101                  # 100 adds and the exit
    assert (r["sysrets"], r["irets"]) == (50, 50)
    assert r["entry_cpl"] == 0                   # the entry always ran in kernel mode
    assert r["entry_flags"] & 0x40700 == 0       # SFMASK applied: IF, TF, DF, AC clear at the entry
    assert r["user_pf"] == 2                     # the supervisor-page read and the jmp to LSTAR went to the guest
    assert r["last_pf_cr2"] & 0xFFF == 0x1E5 and r["last_pf_err"] & 0x4


def test_int3_in_kernel_mode_is_delivered_through_the_guests_idt(syscall_guest: Path) -> None:
    with _boot_to_marker(syscall_guest) as vm:
        r = _results(vm)
        assert r["bp_rip"] == r["int3_addr"] + 1            # trap semantics: the saved RIP follows the int3
        assert r["bp_rsp"] == 0x10D000 - 40                 # IST1 top, aligned, minus the 5-qword frame
        assert (r["bp_cs"], r["bp_ss"], r["bp_rsp_old"]) == (0x08, 0x10, 0x10C000)
        assert r["bp_flags_in"] & 0x200 == 0                # an interrupt gate clears IF
        assert r["bp_flags_in"] & 0x100 == 0
        expected = 1 if vm.workarounds is not None and vm.exit_hooks.counts.get("int3-cpl0") else 0
        assert vm.workarounds is not None and vm.workarounds.counts()["int3-cpl0"] == expected


def test_system_calls_enter_the_foreign_kernel_in_kernel_mode(syscall_guest: Path) -> None:
    with _boot_to_marker(syscall_guest) as vm:
        ev = vm.run(timeout=30)
        _check_user_phase(vm, ev)
        counts = vm.workarounds.counts() if vm.workarounds is not None else {}
        if stays_in_user_mode(Machine):
            assert counts["syscall-completion"] == 101
            assert counts["syscall-passed-on"] == 2
        else:
            assert "syscall-completion" not in counts


def test_forks_and_restores_complete_system_calls_too(syscall_guest: Path, tmp_path: Path) -> None:
    with _boot_to_marker(syscall_guest) as parent:
        child = parent.fork()
        _check_user_phase(child, child.run(timeout=30))
        child.reset()                                       # back to the marker: the same run again
        _check_user_phase(child, child.run(timeout=30))
        child.destroy()
        pchild = parent.fork(isolation="process")
        try:
            ev = pchild.run(timeout=30)
            assert ev.reason == "exit" and ev.status == DONE, ev
        finally:
            pchild.destroy()
        savefile.save(parent, tmp_path / "sg.save")
    restored = savefile.restore(tmp_path / "sg.save")
    with restored:
        _check_user_phase(restored, restored.run(timeout=30))


FNINIT_FWAIT = b"\xdb\xe3\x9b"          # fninit; fwait


def _flat_kernel(code: bytes, **kw: object) -> tuple[VM, flat.FlatLayout]:
    vm = VM.create(memory_mib=8, name="fwait", with_devices=False)
    from vmfork.devices import ExitDevice
    vm.attach_devices([ExitDevice(vm)])
    return vm, flat.setup_long_mode(vm, code=code, cpl=0, **kw)  # type: ignore[arg-type]


def test_fwait_with_nothing_pending_completes() -> None:
    vm, _ = _flat_kernel(FNINIT_FWAIT + flat.exit_with(0x2A))
    with vm:
        ev = vm.run(timeout=10)
        assert ev.reason == "exit" and ev.status == 0x2A, ev


def test_fwait_with_an_unmasked_x87_exception_raises_mf() -> None:
    # x87 arithmetic itself is not emulated in kernel mode here, so the pending exception is put in by the host:
    # invalid operation unmasked in FCW, IE and ES set in FSW (as after an fsqrt of -1)
    vm, layout = _flat_kernel(b"\x9b" + flat.exit_with(0x01))
    with vm:
        from vmfork.kvm import structs as s
        fpu = s.Fpu()
        vm.vcpus[0].fd.get_fpu(fpu)
        fpu.fcw, fpu.fsw, fpu.mxcsr = 0x37E, 0x0081, 0x1F80
        vm.vcpus[0].fd.set_fpu(fpu)
        ev = vm.run(timeout=10)
        assert ev.reason == "exit" and ev.status == layout.trap_status(16), ev


def test_the_catalog_names_every_mechanism() -> None:
    assert {"int3-cpl0", "fwait-cpl0", "syscall-completion"} <= set(CATALOG)
    for w in CATALOG.values():
        assert w.what and w.probe


def test_vmfork_list_json_shows_the_counts(tmp_path: Path, syscall_guest: Path) -> None:
    from cli_harness import CliHarness
    emulated = stays_in_user_mode(Machine)
    with CliHarness(tmp_path, syscall_guest) as ts:
        domid = ts.create_program("sg", "", on_poweroff="preserve")   # runs to its harness marker, pauses there
        ts.wait_state(domid, "paused")
        counts = ts.listed("sg")["workarounds"]
        assert counts["int3-cpl0"] == (1 if emulated else 0), counts
        ts.ok("unpause", str(domid))
        ts.wait_state(domid, "shutdown", timeout=30)
        counts = ts.listed("sg")["workarounds"]
        assert counts.get("syscall-completion") == (101 if emulated else None), counts


# --- the instruction fallbacks, each in a tiny kernel-mode guest (vmfork's flat environment) ----------------------

D = flat.DATA_ADDR


def _abs32(addr: int) -> bytes:
    return struct.pack("<I", addr)


def _run_cpl0(code: bytes, **kw: object) -> tuple[VM, object]:
    vm, _ = _flat_kernel(code + flat.exit_with(0x2A), **kw)
    return vm, vm.run(timeout=10)


def _counted(vm: VM, name: str) -> int:
    assert vm.workarounds is not None
    return vm.workarounds.counts()[name]


def test_clac_stac() -> None:
    code = (b"\x0f\x01\xcb\x9c\x58\x48\x89\x04\x25" + _abs32(D)          # stac; pushfq; pop rax; mov [D], rax
            + b"\x0f\x01\xca\x9c\x58\x48\x89\x04\x25" + _abs32(D + 8))   # clac; ... mov [D+8], rax
    vm, ev = _run_cpl0(code)
    with vm:
        assert getattr(ev, "status", None) == 0x2A, ev
        stac_flags, clac_flags = struct.unpack("<QQ", vm.memory.read(D, 16))
        assert stac_flags & (1 << 18) and not clac_flags & (1 << 18)


def test_popcnt() -> None:
    code = (b"\x48\xb8" + struct.pack("<Q", 0xF0F0F0F0F0)              # mov rax, imm64
            + b"\xf3\x48\x0f\xb8\xd8"                                  # popcnt rbx, rax
            + b"\x48\x89\x1c\x25" + _abs32(D)                          # mov [D], rbx
            + b"\x31\xc9\xf3\x0f\xb8\x0c\x25" + _abs32(D + 8)          # xor ecx, ecx; popcnt ecx, [D+8] (0)
            + b"\x9c\x58\x48\x89\x04\x25" + _abs32(D + 16))            # the flags
    vm, ev = _run_cpl0(code)
    with vm:
        assert getattr(ev, "status", None) == 0x2A, ev
        bits, flags = struct.unpack("<Q8xQ", vm.memory.read(D, 24))
        assert bits == 20 and flags & 0x40                             # ZF: the second source was 0


@pytest.mark.parametrize("equal", [True, False])
def test_cmpxchg16b(equal: bool) -> None:
    code = (b"\x48\xc7\x04\x25" + _abs32(D + 64) + b"\x01\x00\x00\x00"    # [D+64] = 1
            + b"\x48\xc7\x04\x25" + _abs32(D + 72) + b"\x02\x00\x00\x00"  # [D+72] = 2
            + b"\xb8" + struct.pack("<I", 1 if equal else 9) + b"\xba\x02\x00\x00\x00"   # rax, rdx = 1|9, 2
            + b"\xbb\x05\x00\x00\x00\xb9\x06\x00\x00\x00"                 # rbx, rcx = 5, 6
            + b"\xf0\x48\x0f\xc7\x0c\x25" + _abs32(D + 64)                # lock cmpxchg16b [D+64]
            + b"\x9c\x5e\x48\x89\x34\x25" + _abs32(D)                     # pushfq; pop rsi; mov [D], rsi
            + b"\x48\x89\x04\x25" + _abs32(D + 8) + b"\x48\x89\x14\x25" + _abs32(D + 16))   # rax, rdx
    vm, ev = _run_cpl0(code)
    with vm:
        assert getattr(ev, "status", None) == 0x2A, ev
        flags, rax, rdx, lo, hi = struct.unpack("<QQQ40xQQ", vm.memory.read(D, 80))
        if equal:
            assert (lo, hi) == (5, 6) and flags & 0x40
        else:
            assert (lo, hi) == (1, 2) and (rax, rdx) == (1, 2) and not flags & 0x40


def test_xsave_and_xrstor_round_trip() -> None:
    area = D + 0x1000
    code = (b"\xb8\x03\x00\x00\x00\x31\xd2"                 # eax = 3 (x87, SSE), edx = 0
            + b"\x0f\xae\x24\x25" + _abs32(area)            # xsave [area]
            + b"\xc7\x04\x25" + _abs32(area + 160) + struct.pack("<I", 0x12345678)   # XMM0's first dword
            + b"\xc6\x04\x25" + _abs32(area + 512) + b"\x03"    # XSTATE_BV: x87 and SSE not in their init state
            + b"\x0f\xae\x2c\x25" + _abs32(area)            # xrstor [area]: XMM0 takes it
            + b"\x0f\x29\x04\x25" + _abs32(D))              # movaps [D], xmm0
    vm, ev = _run_cpl0(code, xcr0=3)
    with vm:
        assert getattr(ev, "status", None) == 0x2A, ev
        saved = vm.memory.read(area, 528)
        assert saved[24:28] == (0x1F80).to_bytes(4, "little")          # MXCSR
        assert int.from_bytes(saved[512:520], "little") == 3            # XSTATE_BV as the guest set it
        assert vm.memory.read(D, 4) == (0x12345678).to_bytes(4, "little")


def test_xsave_to_an_unmapped_save_area_raises_page_fault() -> None:
    # Linux's signal delivery xsaves straight into the user stack, whose page may be absent: the CPU raises #PF
    # (CR2, error code "write, not present") and the kernel's fixup faults the page in; so must the fallback.
    unmapped = 0x4000_0000                                 # the flat page tables map [0, 1 GiB) only
    code = (b"\xb8\x03\x00\x00\x00\x31\xd2"                 # eax = 3 (x87, SSE), edx = 0
            + b"\x48\xbf" + struct.pack("<Q", unmapped)      # mov rdi, unmapped
            + b"\x0f\xae\x27")                                # xsave [rdi]
    handler = (b"\x0f\x20\xd0"                                # mov rax, cr2
               + b"\x48\x89\x04\x25" + _abs32(D)              # mov [D], rax
               + b"\x58"                                        # pop rax (the error code)
               + b"\x48\x89\x04\x25" + _abs32(D + 8)          # mov [D+8], rax
               + flat.exit_with(0x2B))
    vm, ev = _run_cpl0(code, xcr0=3, handlers={14: handler})
    with vm:
        assert getattr(ev, "status", None) == 0x2B, ev
        cr2, err = struct.unpack("<QQ", vm.memory.read(D, 16))
        assert (cr2, err) == (unmapped, 2)


def test_popcnt_from_an_unmapped_page_raises_page_fault() -> None:
    # a read: error code 0 (not present, read, supervisor)
    unmapped = 0x4000_0000
    code = (b"\x48\xbf" + struct.pack("<Q", unmapped)       # mov rdi, unmapped
            + b"\xf3\x48\x0f\xb8\x07")                       # popcnt rax, [rdi]
    handler = (b"\x0f\x20\xd0" + b"\x48\x89\x04\x25" + _abs32(D)      # mov rax, cr2; mov [D], rax
               + b"\x58" + b"\x48\x89\x04\x25" + _abs32(D + 8)         # pop rax; mov [D+8], rax
               + flat.exit_with(0x2B))
    vm, ev = _run_cpl0(code, handlers={14: handler})
    with vm:
        assert getattr(ev, "status", None) == 0x2B, ev
        assert struct.unpack("<QQ", vm.memory.read(D, 16)) == (unmapped, 0)


# --- page protection: guests/protguest/main.asm, a PVH kernel with its own page tables, IDT and IST stacks ---------

PROT_RWPAGE, PROT_ROPAGE, PROT_RESULTS = 0x108000, 0x109000, 0x105800


def test_fallback_writes_honour_the_guests_page_tables(guest_dir: Path) -> None:
    """cmpxchg16b into a writable page stores as before; into a read-only page it raises #PF (CR2 = the operand,
    error code 3: present, write, supervisor) through the guest's IDT instead of writing through physical memory;
    with CR0.WP clear the kernel may write there. An int3 whose frame cannot be pushed (its stack in the read-only
    page) raises #PF, and a #PF whose frame cannot be pushed a double fault, as on the CPU."""
    with VM.create(memory_mib=16, name="protguest") as vm:
        assert vm.load_kernel(guest_dir / "protguest.elf") == "pvh"
        ev = vm.run(timeout=20)
        names = ("flags1", "pfs", "pf_cr2_0", "pf_cr2_1", "pf_err_0", "pf_err_1", "pf_rip_0", "pf_rip_1", "flags3",
                 "df_cr2", "df_err", "dfs", "cx_rip", "int3_rip")
        r = dict(zip(names, struct.unpack("<14Q", vm.memory.read(PROT_RESULTS, 8 * 14)), strict=True))
        assert getattr(ev, "reason", None) == "exit" and getattr(ev, "status", None) == DONE, (ev, r)
        assert r["flags1"] & 0x40 and vm.memory.read(PROT_RWPAGE, 16) == struct.pack("<QQ", 5, 6)
        # step 2: the cmpxchg16b into the read-only page
        assert (r["pf_cr2_0"], r["pf_err_0"], r["pf_rip_0"]) == (PROT_ROPAGE + 16, 3, r["cx_rip"]), r
        # step 3 (CR0.WP clear) stored 7, 8 there: before it the page held zeros, so step 2 wrote nothing
        assert r["flags3"] & 0x40 and vm.memory.read(PROT_ROPAGE + 16, 16) == struct.pack("<QQ", 7, 8)
        # step 4: the int3's frame (5 qwords below RSP = ROPAGE + 0x800) could not be pushed
        assert r["pfs"] == 2 and (r["pf_err_1"], r["pf_rip_1"]) == (3, r["int3_rip"]), r
        assert PROT_ROPAGE + 0x800 - 40 <= r["pf_cr2_1"] < PROT_ROPAGE + 0x800, r
        # step 5: nor the #PF's frame (6 qwords) on the same stack: a double fault, CR2 in that frame
        assert r["dfs"] == 1 and r["df_err"] == 0, r
        assert PROT_ROPAGE + 0x800 - 48 <= r["df_cr2"] < PROT_ROPAGE + 0x800, r
        if kernel_mode_emulated():              # the fallbacks did it (elsewhere the CPU)
            assert _counted(vm, "cmpxchg16b-cpl0") == 3 and _counted(vm, "int3-cpl0") == 2


def test_doctor_lists_every_workaround_and_checks_the_fallbacks() -> None:
    from vmfork import doctor
    rows = {r["name"]: r for r in doctor.check_workarounds(doctor.probe_host(cached=True))}
    assert set(rows) == set(CATALOG)
    for name, r in rows.items():
        if name.endswith("-cpl0"):
            assert r["check"] == "works", r
            assert r["count"] == (1 if r["needed"] else 0) or name in ("clac-stac-cpl0", "xsave-cpl0"), r
    assert "Linux boot to the shell" in doctor.linux_boot_line()


def test_an_instruction_with_no_fallback_stops_with_its_mnemonic() -> None:
    vm, ev = _run_cpl0(b"\x66\x0f\xfe\xc1")          # paddd xmm0, xmm1: no fallback for SSE2 arithmetic
    with vm:
        if getattr(ev, "reason", None) == "exit":
            pytest.skip("this host runs paddd in guest kernel mode: no emulation failure to report")
        assert getattr(ev, "crashed", False), ev
        detail = getattr(ev, "detail", "")
        assert "emulation failure" in detail and "instruction `paddd xmm0, xmm1`" in detail, detail
        assert "instruction bytes: 66 0f fe c1" in detail
