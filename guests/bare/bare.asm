; A bare Multiboot v1 guest for debugger tests: it follows only public conventions (Multiboot, its own GDT, TSS and
; page tables), prints a fixed sequence to COM1 and exits through port 0xf4 (status 0).
;   nasm -f bin bare.asm                   -> bare-noidt.elf: loads NO IDT at all (legal: it takes no interrupts)
;   nasm -f bin -DWITH_BP_HANDLER bare.asm -> bare-bp.elf: loads an IDT whose only present gate is #BP (DPL 3);
;                                             its user code runs `int3` itself, and the handler prints "[bp]"
; Entry in 32-bit protected mode (CPL0) -> long mode with an identity map of the first GiB (2 MiB pages,
; user-accessible, so vmfork's reserved area 0xA0000-0xBFFFF is mapped too) -> a kernel-mode phase (CPL0, emulated
; on kvm_pvm hosts) that prints "kernel N" five times -> iretq to CPL3 -> a user phase that prints "user N x=HEX"
; twenty times (port I/O allowed by the TSS I/O bitmap) -> exit.
; build.sh writes each image's labels (kernel_tick, user_tick, ...) to a .map file beside it (-DMAPFILE=...).
%ifdef MAPFILE
[map symbols MAPFILE]                   ; build.sh: the labels' addresses, for the tests
%endif

LOAD_ADDR equ 0x00100000
PORT_COM1 equ 0x3f8
PORT_EXIT equ 0xf4
SEL_CODE64 equ 0x08
SEL_DATA equ 0x10
SEL_UCODE equ 0x18 | 3
SEL_UDATA equ 0x20 | 3
SEL_TSS equ 0x28

        org LOAD_ADDR
%include "long_mode.inc"
        section .text

ehdr:
        db 0x7f, "ELF", 1, 1, 1, 0
        times 8 db 0
        dw 2                            ; ET_EXEC
        dw 3                            ; EM_386
        dd 1
        dd mb_entry
        dd phdrs - ehdr
        dd 0, 0
        dw 52, 32, 1, 0, 0, 0
phdrs:
        dd 1                            ; PT_LOAD
        dd 0
        dd LOAD_ADDR, LOAD_ADDR
        dd file_end - ehdr
        dd bss_end - LOAD_ADDR
        dd 7
        dd 0x1000

MB_MAGIC equ 0x1BADB002
MB_FLAGS equ 0
        align 4, db 0
        dd MB_MAGIC, MB_FLAGS, (-(MB_MAGIC + MB_FLAGS)) & 0xFFFFFFFF

; --- page tables: identity map of [0, 1 GiB), 2 MiB pages, present + writable + user ---------------------------
        align 4096, db 0
pml4:
        dq pdpt + 7
        times 511 dq 0
pdpt:
        dq pd + 7
        times 511 dq 0
pd:
%assign i 0
%rep 512
        dq (i << 21) | 0x87
%assign i i + 1
%endrep

; --- GDT and TSS ---------------------------------------------------------------------------------------------------
        align 16, db 0
gdt:
        dq 0
        dq 0x00209A0000000000           ; 0x08 64-bit code, DPL0
        dq 0x0000920000000000           ; 0x10 data, DPL0
        dq 0x0020FA0000000000           ; 0x18 64-bit code, DPL3
        dq 0x0000F20000000000           ; 0x20 data, DPL3
tss_desc:
        dw tss_end - tss - 1            ; 0x28 64-bit TSS (base filled in at boot)
        dw (tss - $$ + LOAD_ADDR) & 0xFFFF
        db ((tss - $$ + LOAD_ADDR) >> 16) & 0xFF, 0x89, 0, (tss - $$ + LOAD_ADDR) >> 24
        dd 0, 0
gdt_end:
gdtr:
        dw gdt_end - gdt - 1
        dq gdt

        align 16, db 0
tss:
        dd 0
%ifdef WITH_BP_HANDLER
        dq kstack_top                   ; RSP0: the kernel stack, for the #BP handler
%else
        dq 0                            ; RSP0: none (the guest never enters kernel mode from user mode)
%endif
        times 11 dq 0                   ; RSP1, RSP2, reserved, IST1-7, reserved
        dw 0
        dw iomap - tss                  ; I/O map base
iomap:                                  ; ports 0-0x3ff: only COM1 (0x3f8-0x3ff) and the exit port (0xf4) allowed
        times 0xf4 / 8 db 0xff
        db ~(1 << (0xf4 % 8)) & 0xff
        times 0x3f8 / 8 - 0xf4 / 8 - 1 db 0xff
        db 0x00
        db 0xff                         ; the terminating byte
tss_end:

%ifdef WITH_BP_HANDLER
        align 16, db 0
idt:
        times 3 dq 0, 0
        dw (bp_handler - $$ + LOAD_ADDR) & 0xFFFF, SEL_CODE64  ; vector 3: a 64-bit interrupt gate, DPL 3
        db 0, 0xEE
        dw (bp_handler - $$ + LOAD_ADDR) >> 16
        dd 0, 0
idt_end:
idtr:
        dw idt_end - idt - 1
        dq idt
%endif

; --- 32-bit entry --------------------------------------------------------------------------------------------------
        bits 32
mb_entry:
        cli
        lgdt [gdtr]
        ENTER_LONG_MODE pml4, SEL_CODE64, long_entry

; --- 64-bit kernel mode --------------------------------------------------------------------------------------------
        bits 64
        default rel
long_entry:
        LOAD_DATA_SEGMENTS SEL_DATA
        lea rsp, [kstack_top]
        mov ax, SEL_TSS
        ltr ax
%ifdef WITH_BP_HANDLER
        lidt [idtr]
%endif
        xor ebx, ebx                    ; kernel phase: "kernel N" five times
kernel_loop:
        lea rsi, [msg_kernel]
        call kputs
kernel_tick:                            ; a kernel-mode instruction the tests break at
        mov eax, ebx
        add al, '0'
        call kputc
        mov al, 10
        call kputc
        inc ebx
        cmp ebx, 5
        jb kernel_loop
        mov ecx, 2000                   ; a silent kernel-mode loop (bench/vmi.py: kernel breakpoint round trips)
kernel_spin:
        dec ecx
        jnz kernel_spin
        push SEL_UDATA                  ; to user mode
        lea rax, [ustack_top]
        push rax
        push 0x002                      ; RFLAGS: IF = 0, IOPL = 0 (port I/O through the TSS I/O bitmap)
        push SEL_UCODE
        lea rax, [user_entry]
        push rax
        iretq

kputs:                                  ; RSI = NUL-terminated string
        lodsb
        test al, al
        jz .done
        call kputc
        jmp kputs
.done:
        ret
kputc:
        mov dx, PORT_COM1
        out dx, al
        ret

%ifdef WITH_BP_HANDLER
bp_handler:                             ; the guest's own #BP handler: prints "[bp]" and returns after the int3
        push rax
        push rdx
        push rsi
        lea rsi, [msg_bp]
        call kputs
        pop rsi
        pop rdx
        pop rax
        iretq
%endif

; --- user mode -----------------------------------------------------------------------------------------------------
user_entry:
        mov ax, SEL_UDATA
        mov ds, ax
        mov es, ax
        xor r12d, r12d                  ; N
        mov r13, 0x1234                 ; x
user_loop:
user_tick:                              ; a user-mode instruction the tests break at
        imul r13, r13, 33
        add r13, r12
        xor r13, 0x5a5a
        lea rsi, [msg_user]
        call uputs
        mov rax, r12
        call uputhex
        lea rsi, [msg_x]
        call uputs
        mov rax, r13
        call uputhex
%ifdef WITH_BP_HANDLER
        test r12b, 3
        jnz .no_int3
        int3                            ; the guest's own breakpoint: its handler prints "[bp]"
.no_int3:
%endif
        mov al, 10
        call uputc
        inc r12
        cmp r12, 20
        jb user_loop
        xor eax, eax
        out PORT_EXIT, al
        jmp $

uputs:
        lodsb
        test al, al
        jz .done
        call uputc
        jmp uputs
.done:
        ret
uputc:
        push rdx
        mov dx, PORT_COM1
        out dx, al
        pop rdx
        ret
uputhex:                                ; RAX as 16 hex digits
        mov rcx, 16
.next:
        rol rax, 4
        push rax
        and al, 15
        add al, '0'
        cmp al, '9'
        jbe .digit
        add al, 'a' - '9' - 1
.digit:
        call uputc
        pop rax
        dec rcx
        jnz .next
        ret

msg_kernel: db "kernel ", 0
msg_user: db "user ", 0
msg_x: db " x=", 0
%ifdef WITH_BP_HANDLER
msg_bp: db " [bp]", 0
%endif

        align 16, db 0
file_end:
        section .bss nobits follows=.text
        alignb 4096
        resb 4096
kstack_top:
        resb 4096
ustack_top:
bss_end:
