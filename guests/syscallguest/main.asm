; vmfork's foreign-convention syscall guest: a tiny PVH kernel with its own GDT, TSS (IST1), IDT, page tables and
; conventions unlike Linux's (kernel CS 0x08 / SS 0x10, user SS 0x1b / CS 0x23, SFMASK 0x40700, no swapgs, a
; supervisor-only 4 KiB page holding every kernel entry point), and a user program that makes system calls.
;   nasm -f bin -o syscallguest.elf main.asm
; Tests (tests/test_syscall_completion.py) read the results block at RESULTS (the layout below) after the exit.
;
; The kernel: long mode, IDT (#BP: interrupt gate on IST1; #PF, #UD, #GP, a default), STAR/LSTAR/SFMASK, EFER.SCE;
; then an `int3` in kernel mode (the host's int3 fallback delivers it), the harness start marker (port 0xf6, value
; 1: the machine pauses there, where tests fork it), and iretq to user mode.
; The user program: LOOPS system calls `add` (rax = 1: returns rdi + rsi; the kernel returns with sysretq for an
; even rdi, with iretq for an odd one), checking each result and that rbx/rbp/r12 survive; then a user read of a
; supervisor-only page and a user `jmp` to LSTAR with IF set, both of which must reach the guest's own #PF handler
; (it resumes at the address in the user's RECOVER word); then syscall `exit` (rax = 60), which writes DONE to the
; exit device (port 0xf4). Any failure exits with a status naming it (see the FAIL_* values).

LOAD    equ 0x100000
PML4    equ 0x101000
PDPT    equ 0x102000
PD      equ 0x103000
PT      equ 0x104000
KDATA   equ 0x105000                    ; GDT, TSS, results (supervisor-only)
IDT     equ 0x106000
KTEXT   equ 0x107000                    ; every kernel entry point (supervisor-only)
UTEXT   equ 0x108000
UDATA   equ 0x109000
USTACK  equ 0x10b000                    ; top of the user stack (page 0x10a000)
KSTACK  equ 0x10c000                    ; top of the kernel stack (page 0x10b000)
ISTACK  equ 0x10d000                    ; top of the IST1 stack (page 0x10c000)
END     equ 0x10d000

RESULTS equ KDATA + 0x800
R_BP_RSP     equ RESULTS + 0x00         ; RSP at the #BP handler's first instruction
R_BP_RIP     equ RESULTS + 0x08         ; the saved RIP of the #BP frame
R_BP_CS      equ RESULTS + 0x10
R_BP_RFLAGS  equ RESULTS + 0x18         ; saved RFLAGS
R_BP_RSP_OLD equ RESULTS + 0x20         ; saved RSP
R_BP_SS      equ RESULTS + 0x28
R_BP_FLAGS_IN equ RESULTS + 0x30        ; RFLAGS inside the handler (IF must be 0: interrupt gate)
R_INT3_ADDR  equ RESULTS + 0x38         ; where the int3 is
R_SYSCALLS   equ RESULTS + 0x40         ; system calls the kernel's entry ran in kernel mode
R_USER_PF    equ RESULTS + 0x48         ; user page faults the guest's own #PF handler saw
R_LAST_PF_ERR equ RESULTS + 0x50
R_LAST_PF_CR2 equ RESULTS + 0x58
R_SYSRETS    equ RESULTS + 0x60
R_IRETS      equ RESULTS + 0x68
R_ENTRY_CPL  equ RESULTS + 0x70         ; OR of (CS & 3) over all syscall entries (0 = always kernel mode)
R_ENTRY_FLAGS equ RESULTS + 0x78        ; OR of RFLAGS at the syscall entry (IF must stay 0: masked by SFMASK)

LOOPS   equ 100
DONE    equ 0x2a
FAIL_RESULT equ 0x51                    ; a system call returned a wrong value
FAIL_REGS   equ 0x52                    ; rbx/rbp/r12 changed across a system call
FAIL_PF     equ 0x53                    ; a user page fault did not reach the guest's #PF handler
FAIL_VECTOR equ 0xe0                    ; + vector: an unexpected exception

KCODE   equ 0x08
KDATA_S equ 0x10
UDATA_S equ 0x1b
UCODE   equ 0x23
TSS_S   equ 0x28
SFMASK  equ 0x40700                     ; AC, DF, IF, TF

        bits 32
        org LOAD
%include "pvh.inc"
%include "long_mode.inc"
        PVH_ELF LOAD, start32, image_end, END

; --- page tables: 0-2 MiB in 4 KiB pages, user-accessible except KDATA, IDT and KTEXT --------------------------------
        times PML4 - ($ - $$ + LOAD) db 0
        dq PDPT + 7
        times 511 dq 0
        dq PD + 7
        times 511 dq 0
        dq PT + 7
        times 511 dq 0
%assign i 0
%rep 512
%if i == (KDATA >> 12) || i == (IDT >> 12) || i == (KTEXT >> 12)
        dq (i << 12) + 3                ; present, writable, supervisor-only
%else
        dq (i << 12) + 7                ; present, writable, user
%endif
%assign i i + 1
%endrep

; --- GDT and TSS -------------------------------------------------------------------------------------------------
gdt:
        dq 0
        dq 0x00af9a000000ffff           ; 0x08 kernel code, 64-bit
        dq 0x00cf92000000ffff           ; 0x10 kernel data
        dq 0x00cff2000000ffff           ; 0x18 user data (sysret SS = STAR[63:48] + 8)
        dq 0x00affa000000ffff           ; 0x20 user code, 64-bit (sysret CS = STAR[63:48] + 16)
        dw 103, (tss - $$ + LOAD) & 0xffff      ; 0x28 TSS (64-bit, 16 bytes)
        db ((tss - $$ + LOAD) >> 16) & 0xff, 0x89, 0, ((tss - $$ + LOAD) >> 24) & 0xff
        dd 0, 0
gdt_end:
gdtr:   dw gdt_end - gdt - 1
        dq gdt
tss:    dd 0
        dq KSTACK                       ; RSP0
        dq 0, 0, 0
        dq ISTACK                       ; IST1
        times 6 dq 0
        dq 0
        dw 0, 104
idtr:   dw 256 * 16 - 1
        dq IDT

; --- IDT (filled at boot) ----------------------------------------------------------------------------------------
        times IDT - ($ - $$ + LOAD) db 0
        times 4096 db 0

; --- kernel text ---------------------------------------------------------------------------------------------------
        times KTEXT - ($ - $$ + LOAD) db 0
start32:
        cli
        lgdt [gdtr]
        ENTER_LONG_MODE PML4, KCODE, start64, 1         ; and EFER.SCE

        bits 64
start64:
        mov ax, KDATA_S
        mov ds, ax
        mov es, ax
        mov ss, ax
        mov rsp, KSTACK
        mov ax, TSS_S
        ltr ax
        ; every gate to the default handler, then #BP (IST1), #UD, #GP, #PF
        xor ecx, ecx
.fill:  mov rax, default_handler
        xor edx, edx
        call set_gate
        inc ecx
        cmp ecx, 256
        jne .fill
        mov ecx, 3
        mov rax, bp_handler
        mov edx, 1                      ; IST1
        call set_gate
        mov ecx, 14
        mov rax, pf_handler
        xor edx, edx
        call set_gate
        lidt [idtr]
        ; system calls: STAR (kernel CS 0x08, sysret base 0x10), LSTAR, SFMASK
        mov ecx, 0xc0000081
        xor eax, eax
        mov edx, (0x10 << 16) | KCODE
        wrmsr
        mov ecx, 0xc0000082
        mov rax, syscall_entry
        mov rdx, rax
        shr rdx, 32
        wrmsr
        mov ecx, 0xc0000084
        mov eax, SFMASK
        xor edx, edx
        wrmsr
        ; an int3 in kernel mode, through IST1
        mov qword [R_INT3_ADDR], the_int3
the_int3:
        int3
        ; the ready marker: the machine pauses here (tests fork it)
        mov eax, 1
        out 0xf6, eax
        ; to user mode
        push UDATA_S
        push USTACK
        push 0x202
        push UCODE
        push user_main
        iretq

%include "set_gate.inc"

bp_handler:
        mov [R_BP_RSP], rsp
        push rax
        mov rax, [rsp + 8]
        mov [R_BP_RIP], rax
        mov rax, [rsp + 16]
        mov [R_BP_CS], rax
        mov rax, [rsp + 24]
        mov [R_BP_RFLAGS], rax
        mov rax, [rsp + 32]
        mov [R_BP_RSP_OLD], rax
        mov rax, [rsp + 40]
        mov [R_BP_SS], rax
        pushfq
        pop rax
        mov [R_BP_FLAGS_IN], rax
        pop rax
        iretq

; #PF: a user fault goes back to the user's recovery address (UDATA word 0); anything else is fatal
pf_handler:
        push rax
        mov rax, [rsp + 24]             ; saved CS (after rax and the error code)
        test al, 3
        jz .fatal
        inc qword [R_USER_PF]
        mov rax, [rsp + 8]
        mov [R_LAST_PF_ERR], rax
        mov rax, cr2
        mov [R_LAST_PF_CR2], rax
        mov rax, [UDATA]
        mov [rsp + 16], rax             ; saved RIP := recovery address
        pop rax
        add rsp, 8                      ; the error code
        iretq
.fatal: mov al, FAIL_VECTOR + 14
        out 0xf4, al
        jmp $

default_handler:                        ; exit with the user's failure code (UDATA word 1), else FAIL_VECTOR
        mov rax, [UDATA + 8]
        test al, al
        jnz .out
        mov al, FAIL_VECTOR
.out:   out 0xf4, al
        jmp $

; The system call entry. Foreign conventions: no swapgs, the user RSP kept in a kernel variable.
syscall_entry:
        mov [user_rsp], rsp
        mov rsp, KSTACK
        push rcx
        push r11
        mov rcx, cs
        and rcx, 3
        or [R_ENTRY_CPL], rcx
        pushfq
        pop rcx
        or [R_ENTRY_FLAGS], rcx
        inc qword [R_SYSCALLS]
        cmp rax, 60
        je .exit
        mov rax, rdi
        add rax, rsi
        pop r11
        pop rcx
        test dil, 1
        jnz .iret
        mov rsp, [user_rsp]
        inc qword [R_SYSRETS]
        o64 sysret
.iret:  inc qword [R_IRETS]
        push UDATA_S
        push qword [user_rsp]
        push r11
        push UCODE
        push rcx
        iretq
.exit:  mov al, DONE
        out 0xf4, al
        jmp $

user_rsp: dq 0

; --- user text -----------------------------------------------------------------------------------------------------
        times UTEXT - ($ - $$ + LOAD) db 0
user_main:
        mov rbx, 0x1111111111111111
        mov rbp, 0x2222222222222222
        mov r12, 0x3333333333333333
        xor r13d, r13d                  ; i
.loop:  mov eax, 1
        mov rdi, r13
        lea rsi, [r13 * 2 + 7]
        syscall
        lea rdx, [r13 * 3 + 7]
        cmp rax, rdx
        jne .bad_result
        mov rdx, 0x1111111111111111
        cmp rbx, rdx
        jne .bad_regs
        mov rdx, 0x2222222222222222
        cmp rbp, rdx
        jne .bad_regs
        mov rdx, 0x3333333333333333
        cmp r12, rdx
        jne .bad_regs
        inc r13
        cmp r13, LOOPS
        jne .loop
        ; a user read of a supervisor-only page: the guest's #PF handler must see it
        mov qword [UDATA], .after_read
        mov rax, [KDATA]
        jmp .bad_pf
.after_read:
        ; a user jmp to LSTAR with IF set: not a syscall, the guest's #PF handler must see it
        mov qword [UDATA], .after_jmp
        mov rax, syscall_entry
        jmp rax
.after_jmp:
        mov eax, 60
        syscall
        jmp $
.bad_result:
        mov al, FAIL_RESULT
        jmp .fail
.bad_regs:
        mov al, FAIL_REGS
        jmp .fail
.bad_pf:
        mov al, FAIL_PF
.fail:  mov [UDATA + 8], al
        ud2                             ; #UD from user mode: the default handler exits with the code
image_end:
