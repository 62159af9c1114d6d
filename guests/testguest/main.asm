; vmfork test guest kernel: one source, two images.
;   nasm -f bin -DVARIANT_MULTIBOOT main.asm  -> ELF32 with a Multiboot v1 header
;   nasm -f bin -DVARIANT_PVH main.asm        -> ELF32 with a Xen PVH entry note
;   either with -DWITH_JSMN -I build/guests/jsmn/ -> the same plus the jsmn fuzzing example's C code (guests/jsmn/,
;                                                  built first by guests/jsmn/build.sh) in a second PT_LOAD at
;                                                  JSMN_ADDR, and the `jsmn` program that calls it
; The ELF headers are written by hand (no linker): one PT_LOAD at 1 MiB from file offset 0, plus a PT_NOTE for PVH.
;
; Image layout (physical = virtual, identity-mapped):
;   0x100000  ELF header, program headers, multiboot header or PVH note
;   0x101000  kernel info block (layout.inc, KI_*)
;   0x102000  PML4, 0x103000 PDPT, 0x104000-0x107fff four page directories (2 MiB pages, first 4 GiB, U/S=1)
;   0x108000  IDT (256 gates, static)
;   0x109000  GDT, TSS, CPL0 code, CPL3 runtime and programs, strings
;   then .bss (not in the file): xsave area, IST stack, kernel stack, user stack

%ifdef VARIANT_PVH
%elifdef VARIANT_MULTIBOOT
%else
%error "define VARIANT_MULTIBOOT or VARIANT_PVH"
%endif

%include "layout.inc"
%ifdef WITH_JSMN
%include "jsmn.inc"                     ; generated: the C code's symbols (guests/jsmn/build.sh)
%if JSMN_TEXT_START != JSMN_ADDR
%error "guests/jsmn/link.ld and layout.inc disagree on JSMN_ADDR"
%endif
%endif

        org LOAD_ADDR
        section .text
        default rel

; ---------------------------------------------------------------------------------------------------------------
; ELF header and program headers
ehdr:
        db 0x7f, "ELF", 1, 1, 1, 0      ; ELFCLASS32, little-endian, EV_CURRENT, System V ABI
        times 8 db 0
        dw 2                            ; ET_EXEC
        dw 3                            ; EM_386
        dd 1                            ; EV_CURRENT
%ifdef VARIANT_PVH
        dd pvh_entry                    ; e_entry (a PVH loader uses the note)
%else
        dd mb_entry
%endif
        dd phdrs - ehdr                 ; e_phoff
        dd 0                            ; e_shoff
        dd 0                            ; e_flags
        dw 52                           ; e_ehsize
        dw 32                           ; e_phentsize
        dw PHNUM + JSMN_PHNUM           ; e_phnum
        dw 0, 0, 0                      ; e_shentsize, e_shnum, e_shstrndx
phdrs:
        dd 1                            ; PT_LOAD
        dd 0                            ; p_offset
        dd LOAD_ADDR                    ; p_vaddr
        dd LOAD_ADDR                    ; p_paddr
        dd file_end - ehdr              ; p_filesz
        dd bss_end - LOAD_ADDR          ; p_memsz
        dd 7                            ; PF_R | PF_W | PF_X
        dd 0x1000                       ; p_align
%ifdef VARIANT_PVH
        dd 4                            ; PT_NOTE
        dd xen_note - ehdr
        dd xen_note
        dd xen_note
        dd xen_note_end - xen_note
        dd xen_note_end - xen_note
        dd 4                            ; PF_R
        dd 4
PHNUM   equ 2
%else
PHNUM   equ 1
%endif
%ifdef WITH_JSMN
        dd 1                            ; PT_LOAD: the jsmn example's code and data at JSMN_ADDR, its .bss zeroed
        dd section..jsmn.start - LOAD_ADDR      ; file offset (4 KiB-aligned, like the address)
        dd JSMN_ADDR
        dd JSMN_ADDR
        dd jsmn_image_end - jsmn_image
        dd JSMN_MEM_END - JSMN_ADDR
        dd 7                            ; PF_R | PF_W | PF_X
        dd 0x1000
JSMN_PHNUM equ 1
%else
JSMN_PHNUM equ 0
%endif

%ifdef VARIANT_PVH
; Xen ELF note: XEN_ELFNOTE_PHYS32_ENTRY (18), 32-bit entry point
        align 4, db 0
xen_note:
        dd 4                            ; namesz
        dd 4                            ; descsz
        dd 18                           ; XEN_ELFNOTE_PHYS32_ENTRY
        db "Xen", 0
        dd pvh_entry
xen_note_end:
        dd 0                            ; not part of the note: QEMU reads the descriptor as 8 bytes
%else
; Multiboot v1 header (must be in the first 8 KiB, 4-byte aligned); flags: bit 1 = give memory information.
; No a.out kludge (bit 16): loaders take the addresses from the ELF program header.
MB_MAGIC equ 0x1BADB002
MB_FLAGS equ 0x00000002
        align 4, db 0
mb_header:
        dd MB_MAGIC
        dd MB_FLAGS
        dd (-(MB_MAGIC + MB_FLAGS)) & 0xFFFFFFFF
%endif

; ---------------------------------------------------------------------------------------------------------------
; Kernel info block, at the fixed address KINFO_ADDR
        times (KINFO_ADDR - LOAD_ADDR) - ($ - $$) db 0
kinfo:
        db "VMFKINFO"
        dd 1                            ; KI_VERSION
        times 0x1000 - ($ - kinfo) db 0

; ---------------------------------------------------------------------------------------------------------------
; Page tables: identity map of 0-4 GiB with 2 MiB pages, all user-accessible (U/S=1).
; The last GiB (MMIO: LAPIC, IOAPIC) is uncached (PCD|PWT).
PTE_P   equ 0x01
PTE_W   equ 0x02
PTE_U   equ 0x04
PTE_PWT equ 0x08
PTE_PCD equ 0x10
PTE_PS  equ 0x80
pml4:
        dq pdpt + (PTE_P | PTE_W | PTE_U)
        times 511 dq 0
pdpt:
        dq pd0 + (PTE_P | PTE_W | PTE_U)
        dq pd0 + 0x1000 + (PTE_P | PTE_W | PTE_U)
        dq pd0 + 0x2000 + (PTE_P | PTE_W | PTE_U)
        dq pd0 + 0x3000 + (PTE_P | PTE_W | PTE_U)
        times 508 dq 0
pd0:
%assign i 0
%rep 2048
  %if i < 1536
        dq (i << 21) | (PTE_P | PTE_W | PTE_U | PTE_PS)
  %else
        dq (i << 21) | (PTE_P | PTE_W | PTE_U | PTE_PS | PTE_PWT | PTE_PCD)
  %endif
  %assign i i+1
%endrep

; ---------------------------------------------------------------------------------------------------------------
; IDT: 64-bit interrupt gates (IF cleared on entry). #BP has DPL 3 so `int3` works from CPL3.
; NMI and #DF run on IST1. Vectors other than 0-31, 0x20 and 0xff are not present.
SEL_KCODE equ 0x08
SEL_KDATA equ 0x10
SEL_UCODE equ 0x18
SEL_UDATA equ 0x20
SEL_TSS   equ 0x28

%macro GATE 3                           ; handler, DPL, IST
        dw (%1 - $$ + LOAD_ADDR) & 0xFFFF
        dw SEL_KCODE
        db %3
        db 0x8E | (%2 << 5)
        dw ((%1 - $$ + LOAD_ADDR) >> 16) & 0xFFFF
        dd 0
        dd 0
%endmacro

idt:
%assign v 0
%rep 32
  %if v == 3
        GATE exc_%[v], 3, 0
  %elif v == 2 || v == 8
        GATE exc_%[v], 0, 1
  %else
        GATE exc_%[v], 0, 0
  %endif
  %assign v v+1
%endrep
        GATE timer_isr, 0, 0            ; 0x20
        times (SPURIOUS_VECTOR - TIMER_VECTOR - 1) * 16 db 0
        GATE spurious_isr, 0, 0         ; 0xff
%if ($ - idt) != 4096
%error "IDT size"
%endif

; ---------------------------------------------------------------------------------------------------------------
; GDT: null, kernel code/data, user code/data, 64-bit TSS
gdt:
        dq 0
        dq 0x00AF9A000000FFFF           ; 0x08 kernel code, 64-bit
        dq 0x00CF92000000FFFF           ; 0x10 kernel data
        dq 0x00AFFA000000FFFF           ; 0x18 user code, 64-bit, DPL 3
        dq 0x00CFF2000000FFFF           ; 0x20 user data, DPL 3
        dw TSS_SIZE - 1                 ; 0x28 TSS (16 bytes)
        dw (tss - $$ + LOAD_ADDR) & 0xFFFF
        db ((tss - $$ + LOAD_ADDR) >> 16) & 0xFF
        db 0x89                         ; present, DPL 0, available 64-bit TSS
        db 0
        db ((tss - $$ + LOAD_ADDR) >> 24) & 0xFF
        dd 0
        dd 0
gdt_end:

        align 8, db 0
gdt_desc:
        dw gdt_end - gdt - 1
        dq gdt
        align 8, db 0
idt_desc:
        dw 256 * 16 - 1
        dq idt
        align 8, db 0
null_idt_desc:
        dw 0
        dq 0

        align 16, db 0
tss:
        dd 0
        dq kstack_top                   ; RSP0: stack for CPL3 -> CPL0 transitions
        dq 0, 0                         ; RSP1, RSP2
        dq 0
        dq ist1_top                     ; IST1: NMI, #DF
        times 6 dq 0                    ; IST2-7
        dq 0
        dw 0
        dw tss_iomap - tss              ; I/O permission bitmap offset
tss_iomap:
        times 0x400 / 8 db 0            ; ports 0-0x3ff allowed to CPL3: kvm_pvm ignores IOPL 3 but its
        db 0xff                         ; emulator checks this bitmap (see README); 0xff ends the bitmap
TSS_SIZE equ $ - tss

%include "kernel.asm"
%include "runtime.asm"
%include "programs.asm"

        align 16, db 0
file_end:

%ifdef WITH_JSMN
; The jsmn example's flat image (guests/jsmn/), in the file after the kernel and at JSMN_ADDR in memory. The .bss is
; declared first with `follows=.text` so that it stays right after the kernel, where it is without the example.
        section .bss nobits align=4096 follows=.text
        section .jsmn progbits follows=.text align=4096 vstart=JSMN_ADDR
jsmn_image:
        incbin "jsmn.bin"
jsmn_image_end:
%endif

; ---------------------------------------------------------------------------------------------------------------
        section .bss nobits align=4096
xsave_area:     resb 4096               ; zeroed: a valid XSAVE image for xrstor with RFBM = 0
ist1_stack:     resb 4096
ist1_top:
kstack:         resb 16384
kstack_top:
ustack:         resb 65536
ustack_top:
bss_end:
