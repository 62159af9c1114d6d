"""Introspection: guest memory (physical, virtual, page walks in every paging mode), registers, symbols,
disassembly and the CLI-facing text functions, on real /dev/kvm machines and the test guest's `vmi` program."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from guest import boot, console, run_to_exit, run_to_ready
from vmfork.errors import MemoryAccessError, VmforkError
from vmfork.fork import VM
from vmfork.vmi import commands
from vmfork.vmi.disasm import decode, disassemble, successors
from vmfork.vmi.errors import (
    NonCanonicalAddress,
    SteppingError,
    SymbolError,
    UnmappedAddress,
    VcpuIndexError,
    VmiError,
)
from vmfork.vmi.memory import AddressSpace, read_phys, read_virt, translate, write_virt
from vmfork.vmi.regs import cpu_mode, format_regs, get_register, set_register
from vmfork.vmi.symbols import SymbolTable

ROOT = Path(__file__).resolve().parents[1]
KINFO = 0x101000


@pytest.fixture
def ready(pvh_guest: Path, machines: list) -> VM:  # type: ignore[type-arg]
    vm = boot(pvh_guest, "vmi 3", machines)
    run_to_ready(vm)
    return vm


# --- physical and virtual memory --------------------------------------------------------------------------------


def test_physical_and_virtual_reads_agree_on_the_identity_map(ready: VM) -> None:
    assert read_phys(ready, KINFO, 8) == b"VMFKINFO"
    assert read_virt(ready, KINFO, 8) == b"VMFKINFO"
    # across a 4 KiB boundary (and a whole page)
    assert read_virt(ready, KINFO + 0xFF8, 16) == read_phys(ready, KINFO + 0xFF8, 16)
    assert read_virt(ready, 0x200000 - 8, 4096) == read_phys(ready, 0x200000 - 8, 4096)


def test_translate_shows_each_level_of_the_walk(ready: VM, symbols: SymbolTable) -> None:
    target = symbols.address("vmi_target")
    t = translate(ready, target)
    assert t.paddr == target and t.mode == "4-level" and t.page_size == 2 << 20
    assert [lv.name for lv in t.levels] == ["PML4", "PDPT", "PD"]
    assert t.levels[0].table == 0x102000 and t.levels[1].table == 0x103000 and t.levels[2].table == 0x104000
    assert t.levels[2].page_size == 2 << 20 and "PS" in t.levels[2].flags and "US" in t.levels[2].flags
    assert t.writable and t.user and t.executable
    text = t.describe()
    assert "PML4[0]" in text and "PD[0]" in text and "2 MiB page" in text and f"physical {target:#x}" in text
    # the page-walk agrees with KVM's own translation
    kvm = ready.vcpus[0].fd.translate(target)
    assert kvm.valid and kvm.physical_address == t.paddr


def test_bad_addresses_are_clear_errors_and_the_guest_runs_on(ready: VM) -> None:
    with pytest.raises(MemoryAccessError, match="outside guest RAM"):
        read_phys(ready, 64 << 20, 16)
    with pytest.raises(MemoryAccessError, match="outside guest RAM"):
        read_phys(ready, (64 << 20) - 8, 16)
    with pytest.raises(NonCanonicalAddress, match="not canonical") as e:
        read_virt(ready, 0x0000800000000000, 8)
    assert e.value.level == "canonical"
    with pytest.raises(UnmappedAddress, match=r"PML4\[36\].*not present") as u:
        translate(ready, 0x123456789000)
    assert u.value.level == "PML4" and len(u.value.walk) == 1
    with pytest.raises(UnmappedAddress, match="PDPT"):
        read_virt(ready, 5 << 30, 8)           # PML4[0] present, PDPT[5] not
    with pytest.raises(VcpuIndexError, match="no vCPU 3"):
        read_virt(ready, KINFO, 8, vcpu=3)
    with pytest.raises(VcpuIndexError):
        get_register(ready, "rip", vcpu=-1)
    with pytest.raises(UnmappedAddress):         # the range is checked before anything is written
        write_virt(ready, (4 << 30) - 4, b"12345678")
    ev = run_to_exit(ready)
    assert ev.status == 0 and "vmi sum=8" in console(ready)


def test_virtual_writes_on_a_fork_are_undone_by_its_reset(ready: VM) -> None:
    fork = ready.fork()
    before = read_phys(fork, 0x800000, 16)
    write_virt(fork, 0x800000 - 4, b"ABCDEFGH")           # crosses a 2 MiB page boundary too
    assert read_phys(fork, 0x800000 - 4, 8) == b"ABCDEFGH"
    assert read_phys(ready, 0x800000 - 4, 8) != b"ABCDEFGH"
    assert fork.reset() == 2
    assert read_phys(fork, 0x800000, 16) == before


# --- paging modes, on hand-made page tables ---------------------------------------------------------------------

P, RW, US, PS, NX = 1, 2, 4, 0x80, 1 << 63


class _Tables:
    """Page tables written into a fresh machine's RAM, one 4 KiB table at a time from 0x10000."""

    def __init__(self, vm: VM) -> None:
        self.vm = vm
        self.next = 0x10000

    def table(self) -> int:
        addr = self.next
        self.next += 0x1000
        return addr

    def set(self, table: int, index: int, value: int, size: int = 8) -> None:
        self.vm.memory.write(table + index * size, value.to_bytes(size, "little"))


def _space(vm: VM, cr0: int, cr4: int, efer: int, cr3: int) -> AddressSpace:
    sregs = vm.vcpus[0].get_sregs()
    sregs.cr0, sregs.cr4, sregs.efer, sregs.cr3 = cr0, cr4, efer, cr3
    return AddressSpace(vm, 0, sregs=sregs, cache=False)


def test_four_and_five_level_paging_with_4k_2m_and_1g_pages(machines: list) -> None:  # type: ignore[type-arg]
    vm = VM.create(memory_mib=64, name="paging")
    machines.append(vm)
    t = _Tables(vm)
    pml5, pml4, pdpt, pd, pt = (t.table() for _ in range(5))
    high_pdpt = t.table()
    # 4-level: 0x40201000 -> 4 KiB page 0x3000; 0x40400000 -> 2 MiB page 0x200000; 0xffff800000000000+1G -> 1 GiB
    t.set(pml4, 0, pdpt | P | RW | US)
    t.set(pdpt, 1, pd | P | RW | US)
    t.set(pd, 1, pt | P | RW)                               # supervisor-only from here
    t.set(pt, 1, 0x3000 | P | NX)
    t.set(pd, 2, 0x200000 | P | RW | US | PS)
    t.set(pml4, 256, high_pdpt | P | RW)
    t.set(high_pdpt, 1, 0 | P | RW | PS)                    # 1 GiB page at physical 0
    efer = (1 << 8) | (1 << 10) | (1 << 11)                 # LME, LMA, NXE
    sp = _space(vm, 0x80000001, 0x20, efer, pml4)
    a = sp.translate(0x40201234)
    assert (a.paddr, a.page_size, [lv.name for lv in a.levels]) == (0x3234, 4096, ["PML4", "PDPT", "PD", "PT"])
    assert not a.writable and not a.user and not a.executable
    b = sp.translate(0x40412345)
    assert (b.paddr, b.page_size) == (0x212345, 2 << 20) and b.writable and b.user
    c = sp.translate(0xFFFF800040000000 + 0x123456)
    assert (c.paddr, c.page_size, c.levels[-1].name) == (0x123456, 1 << 30, "PDPT")
    with pytest.raises(UnmappedAddress) as e:
        sp.translate(0x40203000)
    assert e.value.level == "PT"
    with pytest.raises(NonCanonicalAddress):
        sp.translate(0x0100000000000000)
    # the same tables under a PML5 entry: 5-level paging (CR4.LA57), 57-bit canonical addresses
    t.set(pml5, 0, pml4 | P | RW | US)
    t.set(pml5, 511, pml4 | P | RW | US)
    sp5 = _space(vm, 0x80000001, 0x20 | (1 << 12), efer, pml5)
    d = sp5.translate(0x40412345)
    assert d.paddr == 0x212345 and [lv.name for lv in d.levels] == ["PML5", "PML4", "PDPT", "PD"]
    assert sp5.translate(0xFFFF000040412345).paddr == 0x212345       # PML5[511] -> the same PML4
    with pytest.raises(NonCanonicalAddress):
        sp5.translate(0xFE00000000000000)
    assert sp5.mode.address_bits == 57
    # KVM agrees for 4-level paging (4 KiB and 2 MiB pages: vmfork's CPUID does not offer 1 GiB pages, so KVM's walk
    # takes a PS bit in a PDPT entry as reserved)
    sregs = vm.vcpus[0].get_sregs()
    sregs.cr0, sregs.cr4, sregs.efer, sregs.cr3 = 0x80000011, 0x20, efer, pml4
    sregs.cs.l, sregs.cs.db = 1, 0
    vm.vcpus[0].set_sregs(sregs)
    for va in (0x40201234, 0x40412345):
        k = vm.vcpus[0].fd.translate(va)
        assert k.valid and k.physical_address == translate(vm, va).paddr


def test_pae_and_32_bit_paging(machines: list) -> None:  # type: ignore[type-arg]
    vm = VM.create(memory_mib=64, name="paging32")
    machines.append(vm)
    t = _Tables(vm)
    pdpt = 0x9000
    pd, pt = t.table(), t.table()
    t.set(pdpt, 2, pd | P)                                  # PAE PDPT entries: only P (and cache bits)
    t.set(pd, 3, pt | P | RW | US)
    t.set(pt, 4, 0x5000 | P | RW | US)
    t.set(pd, 4, 0xA00000 | P | RW | PS)
    sp = _space(vm, 0x80000001, 0x20, 0, pdpt)
    a = sp.translate(0x80604123)
    assert (sp.mode.name, a.paddr, a.page_size) == ("pae", 0x5123, 4096)
    assert [lv.name for lv in a.levels] == ["PDPT", "PD", "PT"]
    assert sp.translate(0x80812345).paddr == 0xA12345
    with pytest.raises(UnmappedAddress, match="PDPT"):
        sp.translate(0x40000000)
    with pytest.raises(NonCanonicalAddress):
        sp.translate(1 << 32)
    # 32-bit paging: 4-byte entries, 4 MiB pages with CR4.PSE
    pd32, pt32 = t.table(), t.table()
    t.set(pd32, 1, pt32 | P | RW, 4)
    t.set(pt32, 2, 0x7000 | P | RW, 4)
    t.set(pd32, 2, 0x1C00000 | P | RW | PS, 4)
    sp32 = _space(vm, 0x80000001, 0x10, 0, pd32)
    b = sp32.translate(0x402ABC)
    assert (sp32.mode.name, b.paddr, b.levels[0].entry_size) == ("32-bit", 0x7ABC, 4)
    c = sp32.translate(0x812345)
    assert (c.paddr, c.page_size) == (0x1C12345, 4 << 20)
    off = _space(vm, 0x1, 0, 0, 0)
    assert off.mode.name == "none" and off.translate(0x123456).paddr == 0x123456


# --- registers --------------------------------------------------------------------------------------------------


def test_registers_by_name_and_forks_see_a_changed_register(ready: VM) -> None:
    assert cpu_mode(ready.vcpus[0].get_sregs()).name == "64-bit long mode"
    assert get_register(ready, "rdi") == 0x800000            # the ready marker's convention
    assert get_register(ready, "RIP") == ready.vcpus[0].get_regs().rip
    assert get_register(ready, "cr3") == 0x102000
    assert get_register(ready, "eflags") == get_register(ready, "rflags")
    with pytest.raises(VmiError, match="no register named"):
        get_register(ready, "xyz")
    set_register(ready, "r12", 4)                            # the vmi program's n: 4 calls instead of 3
    fork = ready.fork()
    assert get_register(fork, "r12") == 4
    run_to_exit(fork)
    assert "vmi sum=18 " in console(fork)                   # 1 + 2 + 5 + 10
    text = format_regs(ready)
    assert "vCPU 0: 64-bit long mode, CPL3" in text and "r12 0000000000000004" in text and "cr3 102000" in text


def test_registers_cannot_be_set_while_running(pvh_guest: Path, machines: list) -> None:  # type: ignore[type-arg]
    vm = boot(pvh_guest, "timer 300", machines)
    vm.start()
    try:
        with pytest.raises(VmforkError, match="while it runs"):
            set_register(vm, "rax", 1)
        assert read_phys(vm, KINFO, 8) == b"VMFKINFO"      # reads of a running machine work (racy)
        assert get_register(vm, "rip") >= 0
    finally:
        vm.pause()


# --- symbols and disassembly ------------------------------------------------------------------------------------


def test_symbols_both_ways_from_a_nasm_map(symbols: SymbolTable) -> None:
    target = symbols.address("vmi_target")
    assert symbols.describe(target) == "vmi_target"
    assert symbols.describe(target + 7) == "vmi_target+0x7"
    assert symbols.address("vmi_target+0x7") == target + 7
    sym, off = symbols.lookup(target + 3) or (None, 0)
    assert sym is not None and sym.name == "vmi_target" and off == 3
    with pytest.raises(SymbolError, match="no symbol 'nope'"):
        symbols.address("nope")


@pytest.mark.skipif(shutil.which("ld") is None, reason="needs ld (binutils) to link an ELF with a symbol table")
def test_symbols_from_an_elf_symbol_table(tmp_path: Path, pvh_guest: Path) -> None:
    (tmp_path / "p.asm").write_text("global _start, helper\nsection .text\n_start: nop\n nop\nhelper: ret\n"
                                    "section .data\ncounter: dq 0\n")
    subprocess.run(["nasm", "-f", "elf64", "-o", str(tmp_path / "p.o"), str(tmp_path / "p.asm")], check=True)
    subprocess.run(["ld", "-o", str(tmp_path / "p"), "-Ttext=0x401000", str(tmp_path / "p.o")], check=True)
    table = SymbolTable.load(tmp_path / "p")
    assert table.address("_start") == 0x401000 and table.address("helper") == 0x401002
    assert table.describe(0x401001) == "_start+0x1"
    assert "counter" in table
    biased = SymbolTable.load(tmp_path / "p", bias=0x1000)
    assert biased.address("helper") == 0x402002
    with pytest.raises(SymbolError, match=r"no section headers|no symbol table"):
        SymbolTable.load(pvh_guest)                         # the hand-written guest ELF has none


def test_disassembly_at_a_symbol_and_in_32_bit_code(ready: VM, symbols: SymbolTable) -> None:
    target = symbols.address("vmi_target")
    insns = disassemble(ready, target, 4)
    assert [i.text for i in insns] == ["mov rax, rdi", "imul rax, rdi", "inc rax", "ret"]
    assert [i.size for i in insns] == [3, 4, 3, 1]
    entry = symbols.address("pvh_entry")                    # 32-bit protected-mode entry code
    code = read_phys(ready, entry, 16)
    assert decode(code, entry, 32, 1)[0].text.startswith("mov dword ptr [")
    assert decode(code, entry, 64, 1)[0].text != decode(code, entry, 32, 1)[0].text
    text = commands.disasm_text(ready, target, 2, symbols=symbols)
    assert "<vmi_target>" in text and "48 89 f8" in text


def test_successors_of_branches_returns_and_system_instructions() -> None:
    regs = {n: 0 for n in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11", "r12",
                           "r13", "r14", "r15")}
    regs["rsp"], regs["rax"] = 0x7000, 0x2000
    memory = {0x7000: struct.pack("<Q", 0x401234), 0x2010: struct.pack("<Q", 0x405000)}

    def read(addr: int, size: int) -> bytes:
        return memory[addr][:size]

    assert successors(b"\x74\x05", 0x1000, 64, regs, read)[1] == [0x1002, 0x1007]      # je
    assert successors(b"\xeb\xfe", 0x1000, 64, regs, read)[1] == [0x1000]              # jmp $
    assert successors(b"\xc3", 0x1000, 64, regs, read)[1] == [0x401234]                # ret
    assert successors(b"\xff\x50\x10", 0x1000, 64, regs, read)[1] == [0x405000]        # call [rax+0x10]
    assert successors(b"\xff\xe0", 0x1000, 64, regs, read)[1] == [0x2000]              # jmp rax
    assert successors(b"\xe8\x00\x01\x00\x00", 0x1000, 64, regs, read)[1] == [0x1105]  # call rel32
    assert successors(b"\x48\x89\xf8", 0x1000, 64, regs, read)[1] == [0x1003]          # mov
    for code in (b"\x0f\x05", b"\xcd\x80", b"\x48\xcf", b"\x0f\x0b"):                   # syscall, int, iretq, ud2
        with pytest.raises(SteppingError):
            successors(code, 0x1000, 64, regs, read)


# --- the CLI-facing text functions ------------------------------------------------------------------------------


def test_cli_text_functions(ready: VM) -> None:
    dump = commands.mem_read(ready, KINFO, 32)
    assert isinstance(dump, str)
    first = dump.splitlines()[0]
    assert first.startswith("0000000000101000  56 4d 46 4b 49 4e 46 4f  01 00") and first.endswith("|VMFKINFO........|")
    assert commands.mem_read(ready, KINFO, 8, virt=True, raw=True) == b"VMFKINFO"
    fork = ready.fork()
    written = commands.mem_write(fork, 0x900000, commands.parse_bytes("de ad be ef"), virt=True)
    assert written == "wrote 4 bytes at virtual 0x900000"
    assert read_phys(fork, 0x900000, 4) == bytes.fromhex("deadbeef")
    walk = commands.translate_text(ready, KINFO)
    assert "PDPT[0]" in walk and "physical 0x101000" in walk
    with pytest.raises(UnmappedAddress) as e:
        commands.translate_text(ready, 0x123456789000)
    assert "PML4[36]" in str(e.value) and "table 0x102000" in str(e.value)
    assert "rip" in commands.regs_text(ready, 0)
    with pytest.raises(VcpuIndexError):
        commands.regs_text(ready, 1)
    with pytest.raises(VmiError, match="length"):
        commands.mem_read(ready, 0, 0)
    with pytest.raises(VmiError, match="not hex"):
        commands.parse_bytes("xyz")
