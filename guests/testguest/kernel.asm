; vmfork test guest: everything that runs in CPL0. On kvm_pvm hosts CPL0 is emulated at about 2 us per
; instruction, so this part is short: the boot path runs 34 (multiboot) or 35 (PVH) instructions from the entry
; point to the first CPL3 instruction, a timer interrupt 15, SVC_CPUID 9, SVC_TIMER_START about 30. Only the
; report of an unexpected exception is longer (a few hundred: it prints in CPL0), and it ends the run.

CR0_PE          equ 1 << 0
CR0_PG          equ 1 << 31
CR4_PAE         equ 1 << 5
CR4_OSXSAVE     equ 1 << 18
MSR_APIC_BASE   equ 0x1b
MSR_EFER        equ 0xc0000080
EFER_LME        equ 1 << 8
X2APIC_EOI      equ 0x80b
X2APIC_SVR      equ 0x80f
X2APIC_LVT_TIMER equ 0x832
X2APIC_TIMER_INIT equ 0x838
X2APIC_TIMER_DIV equ 0x83e
XAPIC_BASE      equ 0xfee00000
APIC_ENABLE     equ 1 << 11
APIC_X2APIC     equ 1 << 10
LVT_PERIODIC    equ 1 << 17
LVT_MASKED      equ 1 << 16
RFLAGS_USER     equ 0x3202              ; IOPL 3, IF, reserved bit 1

; ---------------------------------------------------------------------------------------------------------------
; Entry, 32-bit protected mode, paging off, interrupts off, no stack.
        bits 32
mb_entry:                               ; Multiboot: EAX = 0x2BADB002, EBX = multiboot info
        mov dword [kinfo + KI_PROTO], PROTO_MULTIBOOT
        mov [kinfo + KI_BOOT_MAGIC], eax
        jmp enter_long_mode
pvh_entry:                              ; PVH: EBX = hvm_start_info
        mov dword [kinfo + KI_PROTO], PROTO_PVH
        mov eax, [ebx]
        mov [kinfo + KI_BOOT_MAGIC], eax
enter_long_mode:
        mov [kinfo + KI_BOOT_INFO], ebx
        lgdt [gdt_desc]
        mov eax, CR4_PAE
        mov cr4, eax
        mov eax, pml4
        mov cr3, eax
        mov ecx, MSR_EFER
        rdmsr
        or eax, EFER_LME
        wrmsr
        mov eax, cr0
        or eax, CR0_PG | CR0_PE
        mov cr0, eax
        jmp SEL_KCODE:long_mode

        bits 64
long_mode:
        mov eax, SEL_KDATA
        mov ds, ax
        mov es, ax
        mov ss, ax
        mov esp, kstack_top
        lidt [idt_desc]
        mov eax, SEL_TSS
        ltr ax
        mov al, 0xff                    ; mask both 8259 PICs (firmware may have left the PIT running on IRQ 0)
        out 0x21, al
        out 0xa1, al
        push SEL_UDATA | 3
        push ustack_top
        push RFLAGS_USER
        push SEL_UCODE | 3
        push user_start
        iretq                           ; -> CPL3, IOPL 3, interrupts on (on kvm_pvm the IOPL is dropped:
                                        ; the TSS I/O bitmap is what allows port I/O there)

; ---------------------------------------------------------------------------------------------------------------
; Exceptions 0-31. #BP (3) is the service call; every other vector is reported and stops the machine.
%assign v 0
%rep 32
  %if v != 3
exc_%[v]:
    %if !(v == 8 || v == 10 || v == 11 || v == 12 || v == 13 || v == 14 || v == 17 || v == 21 || v == 29 || v == 30)
        push 0                          ; no error code: push a zero so the frame looks the same
    %endif
        push v
        jmp exc_report
  %endif
  %assign v v+1
%endrep

; [rsp] = vector, [rsp+8] = error code, [rsp+16] = RIP, then CS, RFLAGS, RSP, SS.
; Prints "EXCEPTION vec=<n> rip=<hex> err=<hex>" on COM1, writes 0x80|vec to the exit port, halts.
exc_report:
        mov rax, [rsp]
        mov [kinfo + KI_EXC_VEC], rax
        mov rax, [rsp + 8]
        mov [kinfo + KI_EXC_ERR], rax
        mov rax, [rsp + 16]
        mov [kinfo + KI_EXC_RIP], rax
        mov rax, cr2
        mov [kinfo + KI_EXC_CR2], rax
        lea rsi, [str_exc_vec]
        call puts
        mov rax, [rsp]
        call putdec
        lea rsi, [str_exc_rip]
        call puts
        mov rax, [rsp + 16]
        call puthex
        lea rsi, [str_exc_err]
        call puts
        mov rax, [rsp + 8]
        call puthex
        mov al, 10
        call putc
        mov eax, [rsp]
        or al, 0x80
        out PORT_EXIT, al
.halt:
        cli
        hlt
        jmp .halt

; ---------------------------------------------------------------------------------------------------------------
; #BP from `int3` in CPL3: the service call. RAX = service; returns RAX = 0 (or -1: unknown service).
exc_3:
        cmp eax, SVC_TIMER_START
        je svc_timer_start
        cmp eax, SVC_TIMER_STOP
        je svc_timer_stop
        cmp eax, SVC_CPUID
        je svc_cpuid
        cmp eax, SVC_TRIPLE_FAULT
        je svc_triple_fault
        cmp eax, SVC_XRSTOR
        je svc_xrstor
        mov rax, -1
        iretq

svc_cpuid:
        mov eax, edi
        cpuid
        iretq

; Periodic LAPIC timer on vector 0x20 with initial count RDI, divide by 1. x2APIC (MSRs) when CPUID says the CPU
; has it, else xAPIC (MMIO at 0xfee00000).
svc_timer_start:
        push rcx
        push rdx
        mov [kinfo + KI_TIMER_COUNT], rdi
        mov ecx, MSR_APIC_BASE
        rdmsr
        bt dword [kinfo + KI_CPUID1_ECX], 21
        jnc .xapic
        or eax, APIC_ENABLE | APIC_X2APIC
        wrmsr
        mov dword [kinfo + KI_APIC_MODE], 2
        xor edx, edx
        mov ecx, X2APIC_SVR
        mov eax, 0x100 | SPURIOUS_VECTOR
        wrmsr
        mov ecx, X2APIC_TIMER_DIV
        mov eax, 0xb                    ; divide by 1
        wrmsr
        mov ecx, X2APIC_LVT_TIMER
        mov eax, LVT_PERIODIC | TIMER_VECTOR
        wrmsr
        mov ecx, X2APIC_TIMER_INIT
        mov eax, edi
        wrmsr
        jmp svc_done
.xapic:
        or eax, APIC_ENABLE
        wrmsr
        mov dword [kinfo + KI_APIC_MODE], 1
        mov edx, XAPIC_BASE
        mov dword [rdx + 0xf0], 0x100 | SPURIOUS_VECTOR
        mov dword [rdx + 0x3e0], 0xb
        mov dword [rdx + 0x320], LVT_PERIODIC | TIMER_VECTOR
        mov [rdx + 0x380], edi
svc_done:
        pop rdx
        pop rcx
        xor eax, eax
        iretq

svc_timer_stop:
        push rcx
        push rdx
        cmp dword [kinfo + KI_APIC_MODE], 1
        je .xapic
        jb svc_done
        xor edx, edx
        xor eax, eax
        mov ecx, X2APIC_TIMER_INIT
        wrmsr
        mov ecx, X2APIC_LVT_TIMER
        mov eax, LVT_MASKED | TIMER_VECTOR
        wrmsr
        jmp svc_done
.xapic:
        mov edx, XAPIC_BASE
        mov dword [rdx + 0x380], 0
        mov dword [rdx + 0x320], LVT_MASKED | TIMER_VECTOR
        jmp svc_done

; Load an empty IDT, then fault: the fault cannot be delivered (#GP), nor can that (#DF): triple fault, shutdown.
svc_triple_fault:
        lidt [null_idt_desc]
        ud2

; xrstor in CPL0, restoring nothing (RFBM = 0) from a zeroed area. CR4.OSXSAVE is set first when CPUID has XSAVE.
; Real CPUs and QEMU return normally (or #UD without XSAVE); kvm_pvm cannot emulate it.
svc_xrstor:
        bt dword [kinfo + KI_CPUID1_ECX], 26
        jnc .go
        mov rax, cr4
        or eax, CR4_OSXSAVE
        mov cr4, rax
.go:
        push rdx
        xor eax, eax
        xor edx, edx
        xrstor [xsave_area]
        pop rdx
        iretq

; LAPIC timer tick.
timer_isr:
        inc qword [kinfo + KI_TICKS]
        push rax
        push rcx
        push rdx
        xor eax, eax
        cmp dword [kinfo + KI_APIC_MODE], 1
        je .xapic
        xor edx, edx
        mov ecx, X2APIC_EOI
        wrmsr
        jmp .out
.xapic:
        mov edx, XAPIC_BASE
        mov [rdx + 0xb0], eax
.out:
        pop rdx
        pop rcx
        pop rax
        iretq

spurious_isr:
        iretq

str_exc_vec: db "EXCEPTION vec=", 0
str_exc_rip: db " rip=", 0
str_exc_err: db " err=", 0
