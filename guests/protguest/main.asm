; vmfork's page-protection guest: a tiny PVH kernel with its own GDT, TSS (IST1, IST2), IDT and 4 KiB page tables,
; one page of which is present but read-only, that checks the host's instruction fallbacks write guest memory the
; way the CPU does (tests/test_workarounds.py reads the results block at RESULTS after the exit).
;   nasm -f bin -o protguest.elf main.asm
; In kernel mode, with CR0.WP set unless said otherwise:
;   1. lock cmpxchg16b into a writable page: stores RCX:RBX, ZF set;
;   2. lock cmpxchg16b into the read-only page: #PF (IST1) with CR2 = the operand, error code 3 (present, write,
;      supervisor), saved RIP = the cmpxchg16b; the handler resumes at the address in RECOVER;
;   3. the same with CR0.WP clear: a supervisor write to a read-only page is allowed, the store happens;
;   4. int3 with RSP in the read-only page: pushing the #BP frame raises #PF (CR2 in the frame, saved RIP = the int3);
;   5. the same with #PF's gate off IST1, so that pushing the #PF frame faults again: a double fault (IST2), whose
;      handler exits with DONE (port 0xf4). Anything else exits with a FAIL_* status.
; The host completes cmpxchg16b and int3 where kernel mode is emulated (kvm_pvm); elsewhere the CPU does all this.

LOAD    equ 0x100000
PML4    equ 0x101000
PDPT    equ 0x102000
PD      equ 0x103000
PT      equ 0x104000
KDATA   equ 0x105000                    ; GDT, TSS, results
IDT     equ 0x106000
KTEXT   equ 0x107000
RWPAGE  equ 0x108000
ROPAGE  equ 0x109000                    ; present, read-only
KSTACK  equ 0x10b000                    ; top of the kernel stack (page 0x10a000)
IST1    equ 0x10c000
IST2    equ 0x10d000
END     equ 0x10d000

RESULTS equ KDATA + 0x800
R_FLAGS1   equ RESULTS + 0x00           ; RFLAGS after step 1
R_PFS      equ RESULTS + 0x08           ; page faults the #PF handler saw
R_PF_CR2   equ RESULTS + 0x10           ; two of each: steps 2 and 4
R_PF_ERR   equ RESULTS + 0x20
R_PF_RIP   equ RESULTS + 0x30
R_FLAGS3   equ RESULTS + 0x40           ; RFLAGS after step 3
R_DF_CR2   equ RESULTS + 0x48
R_DF_ERR   equ RESULTS + 0x50
R_DFS      equ RESULTS + 0x58
R_CX_RIP   equ RESULTS + 0x60           ; where step 2's cmpxchg16b is
R_INT3_RIP equ RESULTS + 0x68           ; where step 4's int3 is
RECOVER    equ RESULTS + 0x70           ; where the #PF handler resumes

DONE        equ 0x2a
FAIL_NO_PF  equ 0x61                    ; an access that must fault did not
FAIL_NO_DF  equ 0x62
FAIL_VECTOR equ 0xe0

KCODE   equ 0x08
KDATA_S equ 0x10
TSS_S   equ 0x18

        bits 32
        org LOAD
%include "pvh.inc"
%include "long_mode.inc"
        PVH_ELF LOAD, start32, image_end, END

; --- page tables: 0-2 MiB in 4 KiB pages, supervisor-only, writable except ROPAGE ------------------------------------
        times PML4 - ($ - $$ + LOAD) db 0
        dq PDPT + 3
        times 511 dq 0
        dq PD + 3
        times 511 dq 0
        dq PT + 3
        times 511 dq 0
%assign i 0
%rep 512
%if i == (ROPAGE >> 12)
        dq (i << 12) + 1                ; present, read-only
%else
        dq (i << 12) + 3                ; present, writable
%endif
%assign i i + 1
%endrep

; --- GDT and TSS -------------------------------------------------------------------------------------------------
gdt:
        dq 0
        dq 0x00af9a000000ffff           ; 0x08 kernel code, 64-bit
        dq 0x00cf92000000ffff           ; 0x10 kernel data
        dw 103, (tss - $$ + LOAD) & 0xffff      ; 0x18 TSS (64-bit, 16 bytes)
        db ((tss - $$ + LOAD) >> 16) & 0xff, 0x89, 0, ((tss - $$ + LOAD) >> 24) & 0xff
        dd 0, 0
gdt_end:
gdtr:   dw gdt_end - gdt - 1
        dq gdt
tss:    dd 0
        dq KSTACK                       ; RSP0
        dq 0, 0, 0
        dq IST1, IST2
        times 5 dq 0
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
        ENTER_LONG_MODE PML4, KCODE, start64, 0, 1 << 16         ; and CR0.WP

        bits 64
start64:
        mov ax, KDATA_S
        mov ds, ax
        mov es, ax
        mov ss, ax
        mov rsp, KSTACK
        mov ax, TSS_S
        ltr ax
        xor ecx, ecx
.fill:  mov rax, default_handler
        xor edx, edx
        call set_gate
        inc ecx
        cmp ecx, 256
        jne .fill
        mov ecx, 14
        mov rax, pf_handler
        mov edx, 1
        call set_gate
        mov ecx, 8
        mov rax, df_handler
        mov edx, 2
        call set_gate
        lidt [idtr]

        ; 1. a writable page
        mov qword [RWPAGE], 1
        mov qword [RWPAGE + 8], 2
        mov eax, 1
        mov edx, 2
        mov ebx, 5
        mov ecx, 6
        lock cmpxchg16b [RWPAGE]
        pushfq
        pop qword [R_FLAGS1]

        ; 2. the read-only page: #PF
        mov rax, .after2
        mov [RECOVER], rax
        mov rax, .the_cx
        mov [R_CX_RIP], rax
        xor eax, eax
        xor edx, edx
        mov ebx, 7
        mov ecx, 8
.the_cx:
        lock cmpxchg16b [ROPAGE + 16]
        mov al, FAIL_NO_PF
        jmp fail
.after2:
        ; 3. the same with CR0.WP clear: stored
        mov rax, cr0
        btr rax, 16
        mov cr0, rax
        xor eax, eax
        xor edx, edx
        mov ebx, 7
        mov ecx, 8
        lock cmpxchg16b [ROPAGE + 16]
        pushfq
        pop qword [R_FLAGS3]
        mov rax, cr0
        bts rax, 16
        mov cr0, rax

        ; 4. int3 with the stack in the read-only page: the #BP frame cannot be pushed, #PF on IST1
        mov rax, .after4
        mov [RECOVER], rax
        mov rax, .the_int3
        mov [R_INT3_RIP], rax
        mov r15, rsp
        mov rsp, ROPAGE + 0x800
.the_int3:
        int3
        mov al, FAIL_NO_PF
        jmp fail
.after4:
        mov rsp, r15

        ; 5. the same with #PF on the interrupted stack: its frame cannot be pushed either, a double fault
        mov byte [IDT + 14 * 16 + 4], 0
        mov rsp, ROPAGE + 0x800
        int3
        mov al, FAIL_NO_DF
        jmp fail

%include "set_gate.inc"

pf_handler:                             ; records CR2, the error code and the saved RIP; resumes at RECOVER
        push rax
        push rbx
        mov rbx, [R_PFS]
        cmp rbx, 2
        jae default_handler
        mov rax, cr2
        mov [R_PF_CR2 + rbx * 8], rax
        mov rax, [rsp + 16]
        mov [R_PF_ERR + rbx * 8], rax
        mov rax, [rsp + 24]
        mov [R_PF_RIP + rbx * 8], rax
        inc qword [R_PFS]
        mov rax, [RECOVER]
        mov [rsp + 24], rax
        pop rbx
        pop rax
        add rsp, 8                      ; the error code
        iretq

df_handler:
        mov rax, cr2
        mov [R_DF_CR2], rax
        mov rax, [rsp]
        mov [R_DF_ERR], rax
        inc qword [R_DFS]
        mov al, DONE
        jmp fail

default_handler:
        mov al, FAIL_VECTOR
fail:   out 0xf4, al
        jmp $
image_end:
