; ---------------------------------------------------------------------------------------------------------------
; hostile: a guest that attacks the device models from CPL3 (tests/test_hostile_guest.py, bench/hostile.py).
; Prints "vmfork-guest: ready", then at the ready marker the host writes {u64 seed, u64 ops} into the input buffer
; and resumes; the program makes `ops` random accesses chosen by xorshift64 from `seed`, counting each done in the
; input buffer's third qword (HOSTILE_DONE), then the end marker; then back to the ready marker. The accesses:
;   - writes of random values (8/16/32-bit) to the ports vmfork decodes: PIC, PIT, port 0x61, RTC index/data,
;     i8042 data and commands below 0x80 (no reset pulse), COM1's eight registers, and any other port below 0x400
;     (the TSS I/O bitmap opens them to CPL3) except the exit and harness ports 0xf4-0xf9;
;   - reads of the same ports;
;   - 32-bit writes and reads in the IO-APIC's and the local APIC's MMIO pages (garbage redirection entries, LVTs,
;     timer counts, ICR...), and in unbacked guest-physical space at 2 GiB (MMIO exits to vmfork);
;   - a UART burst: 16 bytes to THR, then a FIFO reset and a random line control value mid-transfer, 16 more bytes.
; Interrupts the garbage unmasks may hit vectors the guest has no handler for: the guest then reports the
; exception and exits, which ends that run (the host resets the fork and goes on with the next seed).
HOSTILE_DONE    equ 16

hostile_ports:
        dw 0x20, 0x21, 0xa0, 0xa1, 0x40, 0x41, 0x42, 0x43, 0x61, 0x70, 0x71, 0x60, 0x64
        dw 0x3f8, 0x3f9, 0x3fa, 0x3fb, 0x3fc, 0x3fd, 0x3fe, 0x3ff
HOSTILE_NPORTS  equ ($ - hostile_ports) / 2

prog_hostile:
        PRINT "vmfork-guest: ready", 10
.iteration:
        READY_MARKER
        mov esi, INBUF_ADDR
        mov r12, [rsi]                  ; seed (0 would stay 0: use 1)
        test r12, r12
        jnz .seeded
        mov r12d, 1
.seeded:
        mov r13, [rsi + 8]              ; ops
        mov qword [rsi + HOSTILE_DONE], 0
.op:
        test r13, r13
        jz .done
        dec r13
        XORSHIFT r12, rax
        mov rbx, r12
        shr rbx, 8
        mov ecx, r12d
        and ecx, 7
        cmp ecx, 3
        jb .port_write
        je .port_read
        cmp ecx, 5
        jb .apic_write
        je .apic_read
        cmp ecx, 6
        je .uart_burst
        ; 7: unbacked guest-physical space at 2 GiB (an MMIO exit for vmfork's bus)
        mov eax, ebx
        and eax, 0x07fffffc
        add eax, 0x80000000
        mov edx, r12d
        test bl, 1
        jz .far_read
        mov [rax], edx
        jmp .counted
.far_read:
        mov edx, [rax]
        jmp .counted

.pick_port:                             ; rbx -> dx = a port (a decoded one, or any allowed one below 0x400)
        test bh, 1
        jz .table
        mov edx, ebx
        shr edx, 10
        and edx, 0x3ff
        cmp edx, 0xf4
        jb .port_ok
        cmp edx, 0xf9
        ja .port_ok
        mov edx, 0x80
        jmp .port_ok
.table:
        mov eax, ebx
        shr eax, 10
        xor edx, edx
        mov ecx, HOSTILE_NPORTS
        div ecx
        movzx edx, word [hostile_ports + rdx * 2]
.port_ok:
        cmp edx, 0x3fc                  ; a wide access there would reach port 0x400, outside the I/O bitmap (#GP)
        jb .narrow_ok
        and bl, 0xfe                    ; bit 0 clear: a byte access
.narrow_ok:
        ret

.port_write:
        call .pick_port
        mov rax, r12
        shr rax, 32
        cmp edx, 0x64
        jne .width
        and eax, 0x7f                   ; i8042 commands below 0x80: no reset pulse, no output-port write
.width:
        test bl, 1
        jnz .w16
        out dx, al
        jmp .counted
.w16:
        test bl, 2
        jnz .w32
        out dx, ax
        jmp .counted
.w32:
        out dx, eax
        jmp .counted

.port_read:
        call .pick_port
        test bl, 1
        jnz .r16
        in al, dx
        jmp .counted
.r16:
        test bl, 2
        jnz .r32
        in ax, dx
        jmp .counted
.r32:
        in eax, dx
        jmp .counted

.apic_write:                            ; IO-APIC (0xfec00000) or local APIC (0xfee00000), any dword of the page
        call .apic_addr
        mov rdx, r12
        shr rdx, 32
        mov [rax], edx
        jmp .counted
.apic_read:
        call .apic_addr
        mov edx, [rax]
        jmp .counted
.apic_addr:
        mov eax, ebx
        and eax, 0xffc
        test bh, 0x10
        jz .ioapic
        add eax, 0xfee00000
        ret
.ioapic:
        and eax, 0x1c                   ; IOREGSEL, IOWIN and what lies between
        add eax, 0xfec00000
        ret

.uart_burst:
        mov edx, PORT_COM1
        mov ecx, 16
.b1:    mov al, 'h'
        out dx, al
        loop .b1
        mov edx, PORT_COM1 + 2          ; FCR: FIFOs on and both reset, mid-transfer
        mov al, 0x07
        out dx, al
        mov edx, PORT_COM1 + 3          ; LCR: a random line control value (DLAB too)
        mov eax, ebx
        out dx, al
        mov edx, PORT_COM1
        mov ecx, 16
.b2:    mov al, 'H'
        out dx, al
        loop .b2
        mov edx, PORT_COM1 + 3          ; back to 8N1, so the console stays readable most of the time
        mov al, 0x03
        out dx, al

.counted:
        mov esi, INBUF_ADDR
        inc qword [rsi + HOSTILE_DONE]
        jmp .op
.done:
        END_MARKER
        jmp .iteration
