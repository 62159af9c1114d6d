; vmfork's page-writer guest: a tiny PVH kernel that, in kernel mode, writes one qword into each of PAGES pages.
;   nasm -f bin -o pagewriter.elf main.asm
; Its own GDT and page tables (2 MiB pages over the first 64 MiB), no IDT. It stops at the harness start marker (port
; 0xf6, value 1: a domain pauses there, where tests fork it), then writes the pages from 4 MiB up and exits with
; DONE (port 0xf4). Where kernel mode is emulated (kvm_pvm) every store is emulated and logs a dirty-ring entry
; without the ring's soft limit stopping it, so a fork logging into dirty rings loses entries: the test of how a
; jailed fork domain counts its pages then (tests/test_jail.py).

LOAD    equ 0x100000
PML4    equ 0x101000
PDPT    equ 0x102000
PD      equ 0x103000
STACK   equ 0x105000
END     equ 0x105000
FIRST   equ 0x400000                    ; the first page written
PAGES   equ 8000
DONE    equ 0x2a

        bits 32
        org LOAD
%include "pvh.inc"
%include "long_mode.inc"
        PVH_ELF LOAD, start32, image_end, END

        times PML4 - ($ - $$ + LOAD) db 0
        dq PDPT + 3
        times 511 dq 0
        dq PD + 3
        times 511 dq 0
%assign i 0
%rep 32
        dq (i << 21) + 0x83             ; 2 MiB page: present, writable, PS
%assign i i + 1
%endrep
        times 512 - 32 dq 0

gdt:    dq 0
        dq 0x00af9a000000ffff           ; 0x08 kernel code, 64-bit
        dq 0x00cf92000000ffff           ; 0x10 kernel data
gdt_end:
gdtr:   dw gdt_end - gdt - 1
        dq gdt

start32:
        cli
        lgdt [gdtr]
        ENTER_LONG_MODE PML4, 0x08, start64

        bits 64
start64:
        mov ax, 0x10
        mov ds, ax
        mov es, ax
        mov ss, ax
        mov rsp, STACK
        mov eax, 1
        out 0xf6, eax                   ; the harness start marker
        mov rdi, FIRST
        mov ecx, PAGES
.write: mov [rdi], rdi
        add rdi, 4096
        dec ecx
        jnz .write
        mov al, DONE
        out 0xf4, al
        jmp $
image_end:
