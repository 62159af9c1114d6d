; kfx-target: a small Multiboot v1 kernel that follows none of vmfork's test-guest conventions, the way a KF/x user's
; target does. Built by guests/build.sh into build/guests/kfx-multiboot.elf (nasm -f bin, ELF headers by hand).
;
; - its own GDT, TSS (RSP0, IST1 for #DF), IDT (32 exception gates) and 4-level page tables:
;     0 - 1 GiB             identity, 2 MiB pages (the image, stacks, the buffers' physical pages)
;     0xffff888000000000    a Linux-style direct map of the same first GiB (virtual = 0xffff888000000000 + physical)
;     0xffffc90000000000    a vmalloc-style area of two 4 KiB pages that are NOT contiguous in physical memory:
;                           page 0 -> BUF_A (0x300000), page 1 -> BUF_B (0x280000)
;   everything user-accessible (U/S = 1), so the parser can run in CPL3 (see below)
; - KF/x's breakpoint harness: int3 with RAX = 0x13371337 at the start (RDI = buffer, RSI = size) and with the SAME
;   magic at the end; its #BP handler just returns (without a fuzzer the loop runs on)
; - its own fault handlers: print `FAULT vec=V rip=R` on COM1 and halt. Nothing on port 0xf4 or 0xf6.
; - the input buffer: BUF_SIZE bytes at VMALLOC_BUF (0xffffc90000000ff0: 16 bytes in page 0, the rest in page 1),
;   or with `direct` on the command line at the direct-map address of BUF_A + 0xff0 (contiguous physical memory)
; - `parse` reads raw bytes (no length prefix); its planted bugs, behind a magic that straddles the page boundary
;   (bytes 14..17: "KFX" then a digit):
;     '1'  reads an unmapped address   -> #PF at parse.bug1_load
;     '2'  writes an unmapped address  -> #PF at parse.bug2_store (same vector, another RIP: a second bug)
;     '3'  calls `helper`, outside parse's code, which runs ud2 -> #UD outside the covered range (the guest's own
;          handler prints and halts)
;     '4'  overwrites the TSS's RSP0 (everything is user-accessible here), then ud2: the #UD cannot be delivered
;          (no kernel stack), nor the #PF that follows -> a double fault, on its IST stack
;   With `kernel` on the command line the harness and parser run in CPL0 instead (the user-mode page tables and
;   stack are then simply not used; '4' is a plain #UD there)
; - on boot it prints `kfx-target parse=0x... end=0x... buf=0x...` (what --cover auto reads)
;
; Why the harness and parser run in CPL3: on hosts where guest kernel mode is emulated (kvm_pvm), an int3 in CPL0
; stops the VM with an emulation failure; in CPL3 it reaches the IDT like on any CPU. The faults are still taken by
; the kernel's (CPL0) handlers, where vmfork's hardware breakpoints see them.

        bits 32
        org 0x100000
%include "long_mode.inc"
LOAD    equ 0x100000

BUF_A        equ 0x300000
BUF_B        equ 0x280000
BUF_OFF      equ 0xff0
BUF_SIZE     equ 0x100
DIRECT_MAP   equ 0xffff888000000000
VMALLOC      equ 0xffffc90000000000
KSTACK_TOP   equ 0x1f0000
DFSTACK_TOP  equ 0x1f8000
USTACK_TOP   equ 0x1e0000
UNMAPPED     equ 0x40000000         ; beyond the first GiB: not present
COM1         equ 0x3f8
MAGIC        equ 0x13371337

%define PHYS(x) ((x) - $$ + LOAD)

ehdr:
        db 0x7f, "ELF", 1, 1, 1, 0
        times 8 db 0
        dw 2, 3                         ; ET_EXEC, EM_386
        dd 1, PHYS(entry), phdr - ehdr, 0, 0
        dw 52, 32, 1, 0, 0, 0
phdr:
        dd 1, 0, LOAD, LOAD, file_end - ehdr, file_end - ehdr, 7, 0x1000

        align 4
mb_header:
        dd 0x1BADB002, 0, -0x1BADB002   ; flags 0: no requirements

; --- 32-bit entry: EAX = 0x2BADB002, EBX = multiboot info ------------------------------------------------------------
entry:
        cli
        mov [PHYS(mbi)], ebx
        lgdt [PHYS(gdt_ptr)]
        ENTER_LONG_MODE PHYS(pml4), 0x08, PHYS(long_entry)

        bits 64
long_entry:
        LOAD_DATA_SEGMENTS 0x10
        mov rsp, KSTACK_TOP
        lidt [rel idt_ptr]
        mov ax, 0x28
        ltr ax
        mov al, 0xff                    ; mask both PICs: no interrupts at all
        out 0x21, al
        out 0xa1, al
        ; the buffer: the vmalloc area, or the direct map with `direct` on the command line
        mov rax, VMALLOC + BUF_OFF
        mov [rel buf_va], rax
        mov ebx, [rel mbi]
        test dword [rbx], 1 << 2        ; MBI_CMDLINE
        jz .print
        mov esi, [rbx + 16]
.scan:  mov al, [rsi]
        test al, al
        jz .print
        inc rsi
        cmp al, 'k'
        je .kernel
        cmp al, 'd'
        jne .scan
        cmp byte [rsi], 'i'
        jne .scan
        mov rax, DIRECT_MAP + BUF_A + BUF_OFF
        mov [rel buf_va], rax
        jmp .scan
.kernel:
        cmp byte [rsi], 'e'
        jne .scan
        mov byte [rel kernel_mode], 1
        jmp .scan
.print:
        lea rsi, [rel msg_boot]
        call puts
        lea rax, [rel parse]
        call put_hex
        lea rsi, [rel msg_end]
        call puts
        lea rax, [rel parse_end]
        call put_hex
        lea rsi, [rel msg_buf]
        call puts
        mov rax, [rel buf_va]
        call put_hex
        mov al, 10
        out dx, al
        cmp byte [rel kernel_mode], 0
        jne user_main                   ; `kernel`: the harness and parser run right here, in CPL0
        ; to user mode: SS, RSP, RFLAGS (IF = 0), CS, RIP
        push 0x23
        push USTACK_TOP
        push 0x2
        push 0x1b
        lea rax, [rel user_main]
        push rax
        iretq

; puts(rsi = NUL-terminated string), put_hex(rax): straight to COM1 (no LSR polling: every exit counts)
puts:   mov dx, COM1
.next:  lodsb
        test al, al
        jz .done
        out dx, al
        jmp .next
.done:  ret

put_hex:
        mov rcx, 16
        mov rdi, rax
        mov dx, COM1
.digit: rol rdi, 4
        mov eax, edi
        and eax, 15
        cmp eax, 10
        jb .dec
        add eax, 'a' - '0' - 10
.dec:   add eax, '0'
        out dx, al
        loop .digit
        ret

; --- the guest's own exception handlers ---------------------------------------------------------------------------
%macro FAULT_STUB 1
fault_%1:
%if %1 = 8 || (%1 >= 10 && %1 <= 14) || %1 = 17
%else
        push 0                          ; no error code: a zero in its place
%endif
        push %1
        jmp fault_common
%endmacro
%assign v 0
%rep 32
FAULT_STUB %[v]
%assign v v+1
%endrep

fault_common:                           ; [rsp] = vector, [rsp+8] = error code, [rsp+16] = RIP
        lea rsi, [rel msg_fault]
        call puts
        mov rax, [rsp]
        call put_hex
        lea rsi, [rel msg_rip]
        call puts
        mov rax, [rsp + 16]
        call put_hex
        mov al, 10
        out dx, al
.halt:  cli
        hlt
        jmp .halt

bp_handler:                             ; #BP: KF/x's harness int3s are no-ops without a fuzzer
        iretq

; --- user mode: KF/x's harness around the parser --------------------------------------------------------------------
user_main:
        ; a moment (tens of ms, native CPL3) before the first start marker: a fuzzer that attaches while the kernel
        ; boots must not miss it, since the end marker has the same magic (the first magic int3 seen is the start)
        mov ecx, 50000000
        cmp byte [rel kernel_mode], 0
        je .settle
        mov ecx, 1000                   ; CPL0 is emulated on some hosts (1-2 us an instruction): far fewer
.settle:
        dec ecx
        jnz .settle
.loop:
        mov rdi, [rel buf_va]
        mov esi, BUF_SIZE
        mov eax, MAGIC
        int3                            ; start: RDI/RSI = buffer, size
        call parse
        mov eax, MAGIC
        int3                            ; end: the same magic
        jmp .loop

parse:                                  ; parse(rdi = buffer, rsi = size): raw bytes
        cmp rsi, 18
        jb .ok
        cmp byte [rdi + 14], 'K'
        jne .ok
        cmp byte [rdi + 15], 'F'
        jne .ok
        cmp byte [rdi + 16], 'X'        ; the first byte of the buffer's second page
        jne .ok
        movzx eax, byte [rdi + 17]
        cmp al, '1'
        je .bug1
        cmp al, '2'
        je .bug2
        cmp al, '3'
        je .outside
        cmp al, '4'
        je .double
.ok:    xor eax, eax
        ret
.bug1:  mov rbx, UNMAPPED
.bug1_load:
        mov rax, [rbx]                  ; #PF: reads an unmapped page
        ret
.bug2:  mov rbx, UNMAPPED + 0x1000
.bug2_store:
        mov [rbx], rax                  ; #PF: writes an unmapped page
        ret
.outside:
        call helper
        ret
.double:
        mov qword [rel tss + 4], UNMAPPED       ; an out-of-bounds write that hits the TSS: RSP0 broken
        ud2                             ; #UD cannot be delivered (no kernel stack) -> #PF -> #DF (IST1)
        ret
parse_end:

helper:                                 ; outside parse's range
        ud2
        ret

; --- data ------------------------------------------------------------------------------------------------------------
msg_boot:  db "kfx-target parse=0x", 0
msg_end:   db " end=0x", 0
msg_buf:   db " buf=0x", 0
msg_fault: db "FAULT vec=0x", 0
msg_rip:   db " rip=0x", 0

        align 8
mbi:    dq 0
buf_va: dq 0
kernel_mode: dq 0

        align 8
gdt:    dq 0
        dq 0x00209A0000000000           ; 0x08 kernel code, 64-bit
        dq 0x0000920000000000           ; 0x10 kernel data
        dq 0x0020FA0000000000           ; 0x18 user code, 64-bit, DPL 3
        dq 0x0000F20000000000           ; 0x20 user data, DPL 3
        dw tss_end - tss - 1, PHYS(tss) & 0xffff   ; 0x28 TSS
        db (PHYS(tss) >> 16) & 0xff, 0x89, 0, (PHYS(tss) >> 24) & 0xff
        dd 0, 0
gdt_end:
gdt_ptr:
        dw gdt_end - gdt - 1
        dq PHYS(gdt)

        align 8
tss:    dd 0
        dq KSTACK_TOP, 0, 0             ; RSP0-2
        dq 0
        dq DFSTACK_TOP                  ; IST1
        times 6 dq 0
        dq 0
        dw 0, tss_end - tss             ; no I/O bitmap
tss_end:

; IDT gate: handler, selector 0x08, IST, type (0x8E interrupt gate DPL 0, 0xEE DPL 3)
%macro GATE 3
        dw PHYS(%1) & 0xffff, 0x08
        db %2, %3
        dw (PHYS(%1) >> 16) & 0xffff
        dd 0, 0
%endmacro
        align 16
idt:
%assign v 0
%rep 32
%if v = 3
        GATE bp_handler, 0, 0xEE
%elif v = 8
        GATE fault_8, 1, 0x8E
%else
        GATE fault_%[v], 0, 0x8E
%endif
%assign v v+1
%endrep
idt_end:
idt_ptr:
        dw idt_end - idt - 1
        dq PHYS(idt)

; --- page tables --------------------------------------------------------------------------------------------------
        align 4096
pml4:
        dq PHYS(pdpt) + 7               ; [0]   identity
        times 272 dq 0
        dq PHYS(pdpt) + 7               ; [273] 0xffff888000000000: the direct map (the same first GiB)
        times 128 dq 0
        dq PHYS(pdpt_vm) + 7            ; [402] 0xffffc90000000000: the vmalloc area
        times 109 dq 0
pdpt:
        dq PHYS(pd) + 7
        times 511 dq 0
pd:
%assign i 0
%rep 512
        dq (i << 21) | 0x87             ; P RW US PS: 2 MiB pages
%assign i i+1
%endrep
pdpt_vm:
        dq PHYS(pd_vm) + 7
        times 511 dq 0
pd_vm:
        dq PHYS(pt_vm) + 7
        times 511 dq 0
pt_vm:
        dq BUF_A + 7                    ; page 0 of the buffer area
        dq BUF_B + 7                    ; page 1: physically BELOW page 0, not next to it
        times 510 dq 0
file_end:
