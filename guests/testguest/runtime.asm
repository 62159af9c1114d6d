; vmfork test guest: the CPL3 runtime. Runs natively and does port I/O directly (IOPL 3 on real CPUs and QEMU, the
; TSS I/O bitmap on kvm_pvm), entering the kernel only for services (int3).
; Library routines preserve every register they do not return in; the CPL0 exception report uses them too.

        bits 64

; PRINT "text", 10 -- print a literal string
%macro PRINT 1+
        jmp %%over
%%str:  db %1, 0
%%over:
        push rsi
        lea rsi, [%%str]
        call puts
        pop rsi
%endmacro

; ARG reg, index, default -- reg = numeric argument `index` (0 = first after the program word) or the default
%macro ARG 3
        mov %1, %3
        cmp qword [kinfo + KI_ARGC], %2
        jbe %%none
        mov %1, [kinfo + KI_ARGS + 8 * %2]
%%none:
%endmacro

; READY_MARKER -- harness start marker: RDI = input buffer, RSI = its size, `out` 1 to the harness port. The VMM
; pauses right after the `out` (forks and resets go back to that point) and fills the input buffer. Inline, not a
; call, so that resuming there reads nothing from the stack: a state-only reset (registers back to the marker,
; memory as it is) must not return through a stack slot written after the marker. Clobbers RAX, RSI, RDI.
%macro READY_MARKER 0
        mov edi, INBUF_ADDR
        mov esi, INBUF_SIZE
        mov eax, HARNESS_READY
        out PORT_HARNESS, eax
%endmacro

; INPUT_ARGS -- the input buffer's arguments for a parser: RDI = its bytes, RCX = their count (the buffer's u64
; length, at most INBUF_SIZE - 8). Clobbers RSI.
%macro INPUT_ARGS 0
        mov esi, INBUF_ADDR
        mov rcx, [rsi]                  ; length
        cmp rcx, INBUF_SIZE - 8
        jbe %%len_ok
        mov ecx, INBUF_SIZE - 8
%%len_ok:
        lea rdi, [rsi + 8]
%endmacro

; END_MARKER -- harness end marker. Clobbers RAX.
%macro END_MARKER 0
        mov eax, HARNESS_END
        out PORT_HARNESS, eax
%endmacro

; XORSHIFT state, tmp -- one xorshift64 step (13, 7, 17)
%macro XORSHIFT 2
        mov %2, %1
        shl %2, 13
        xor %1, %2
        mov %2, %1
        shr %2, 7
        xor %1, %2
        mov %2, %1
        shl %2, 17
        xor %1, %2
%endmacro

DEFAULT_SEED    equ 0x9E3779B97F4A7C15
FNV_OFFSET      equ 0xcbf29ce484222325
FNV_PRIME       equ 0x100000001b3
MB_INFO_MAGIC   equ 0x2BADB002
PVH_INFO_MAGIC  equ 0x336ec578

; ---------------------------------------------------------------------------------------------------------------
user_start:
        mov edi, 1
        xor ecx, ecx
        call kcpuid
        mov [kinfo + KI_CPUID1_ECX], ecx
        mov [kinfo + KI_CPUID1_EDX], edx
        call parse_boot_info
        call parse_cmdline
        mov rsi, [kinfo + KI_PROG]
        lea rbx, [prog_table]
.next:
        mov rdi, [rbx]
        test rdi, rdi
        jz prog_unknown
        call streq
        je .found
        add rbx, 16
        jmp .next
.found:
        jmp [rbx + 8]

; edi = leaf, ecx = subleaf -> eax, ebx, ecx, edx: CPUID through the kernel (SVC_CPUID), so that it reports the
; VMM's CPUID even where a CPUID in CPL3 runs natively (kvm_pvm)
kcpuid:
        mov eax, SVC_CPUID
        int3
        ret

; ---------------------------------------------------------------------------------------------------------------
; Boot information -> KI_CMDLINE_PADDR and the RAM fields.
parse_boot_info:
        mov rbx, [kinfo + KI_BOOT_INFO]
        mov eax, [kinfo + KI_PROTO]
        cmp eax, PROTO_MULTIBOOT
        je .mb
        cmp eax, PROTO_PVH
        je .pvh
        ret
.mb:
        cmp dword [kinfo + KI_BOOT_MAGIC], MB_INFO_MAGIC
        jne .ret
        mov ecx, [rbx]                  ; flags
        test ecx, 1 << 2
        jz .mb_no_cmdline
        mov eax, [rbx + 16]
        mov [kinfo + KI_CMDLINE_PADDR], rax
.mb_no_cmdline:
        test ecx, 1 << 6
        jz .mb_no_mmap
        mov esi, [rbx + 48]             ; mmap_addr
        mov edi, [rbx + 44]             ; mmap_length
        add rdi, rsi
.mb_mmap:
        lea rax, [rsi + 24]
        cmp rax, rdi
        ja .done
        mov r8, [rsi + 4]               ; base_addr
        mov r9, [rsi + 12]              ; length
        mov eax, [rsi + 20]             ; type
        call add_region
        mov eax, [rsi]                  ; size (of the entry, without this field)
        lea rsi, [rsi + rax + 4]
        jmp .mb_mmap
.mb_no_mmap:
        test ecx, 1 << 0
        jz .done
        xor r8d, r8d                    ; mem_lower KiB from 0, mem_upper KiB from 1 MiB
        mov r9d, [rbx + 4]
        shl r9, 10
        mov eax, 1
        call add_region
        mov r8d, 0x100000
        mov r9d, [rbx + 8]
        shl r9, 10
        mov eax, 1
        call add_region
        jmp .done
.pvh:
        cmp dword [rbx], PVH_INFO_MAGIC
        jne .ret
        mov rax, [rbx + 24]             ; cmdline_paddr
        mov [kinfo + KI_CMDLINE_PADDR], rax
        cmp dword [rbx + 4], 1          ; version 1 adds memmap_paddr, memmap_entries
        jb .done
        mov rsi, [rbx + 40]
        mov ecx, [rbx + 48]
.pvh_mmap:
        test ecx, ecx
        jz .done
        mov r8, [rsi]                   ; addr
        mov r9, [rsi + 8]               ; size
        mov eax, [rsi + 16]             ; type
        call add_region
        add rsi, 24
        dec ecx
        jmp .pvh_mmap
.done:
        mov rax, [kinfo + KI_RAM_BYTES]
        add rax, 0xfffff
        shr rax, 20
        mov [kinfo + KI_RAM_MIB], rax
.ret:
        ret

; r8 = base, r9 = length, eax = type (1 = usable RAM)
add_region:
        cmp eax, 1
        jne .ret
        push r10
        add [kinfo + KI_RAM_BYTES], r9
        lea r10, [r8 + r9]
        cmp r10, [kinfo + KI_RAM_TOP]
        jbe .not_top
        mov [kinfo + KI_RAM_TOP], r10
.not_top:
        cmp r8, 0x100000
        ja .not_low
        cmp r10, 0x100000
        jbe .not_low
        mov [kinfo + KI_RAM_LOW_TOP], r10
.not_low:
        pop r10
.ret:
        ret

; ---------------------------------------------------------------------------------------------------------------
; Command line -> KI_CMDLINE (copy, split into NUL-terminated words), KI_PROG, KI_ARGC, KI_ARGS.
; A first word containing '/' or '.' is the kernel image path (QEMU and GRUB put it in the multiboot command
; line) and is skipped. No program word at all means `hello`.
MAX_WORDS equ 10
parse_cmdline:
        mov rsi, [kinfo + KI_CMDLINE_PADDR]
        lea rdi, [kinfo + KI_CMDLINE]
        mov ecx, KI_CMDLINE_MAX
        test rsi, rsi
        jz .copied
.copy:
        mov al, [rsi]
        test al, al
        jz .copied
        mov [rdi], al
        inc rsi
        inc rdi
        dec ecx
        jnz .copy
.copied:
        mov byte [rdi], 0
        sub rsp, MAX_WORDS * 8          ; word pointers
        lea rsi, [kinfo + KI_CMDLINE]
        xor ebx, ebx                    ; number of words
.separator:
        mov al, [rsi]
        test al, al
        jz .split
        cmp al, ' '
        ja .word
        mov byte [rsi], 0
        inc rsi
        jmp .separator
.word:
        cmp ebx, MAX_WORDS
        jae .split
        mov [rsp + rbx * 8], rsi
        inc ebx
.in_word:
        inc rsi
        mov al, [rsi]
        test al, al
        jz .split
        cmp al, ' '
        ja .in_word
        jmp .separator
.split:
        xor ecx, ecx                    ; index of the program word
        test ebx, ebx
        jz .no_program
        mov rsi, [rsp]
.path_char:
        mov al, [rsi]
        test al, al
        jz .program
        inc rsi
        cmp al, '/'
        je .is_path
        cmp al, '.'
        jne .path_char
.is_path:
        inc ecx
.program:
        cmp ecx, ebx
        jae .no_program
        mov rax, [rsp + rcx * 8]
        mov [kinfo + KI_PROG], rax
        inc ecx
        xor edx, edx                    ; argc
.args:
        cmp ecx, ebx
        jae .done
        cmp edx, 8
        jae .done
        mov rsi, [rsp + rcx * 8]
        call parse_num
        mov [abs kinfo + KI_ARGS + rdx * 8], rax
        inc edx
        inc ecx
        jmp .args
.no_program:
        lea rax, [name_hello]
        mov [kinfo + KI_PROG], rax
        xor edx, edx
.done:
        mov [kinfo + KI_ARGC], rdx
        add rsp, MAX_WORDS * 8
        ret

; rsi = NUL-terminated word -> rax = its value: decimal, or hex with a 0x prefix; stops at the first bad digit
parse_num:
        push rsi
        push rcx
        xor eax, eax
        cmp byte [rsi], '0'
        jne .dec
        mov cl, [rsi + 1]
        or cl, 0x20
        cmp cl, 'x'
        jne .dec
        add rsi, 2
.hex:
        movzx ecx, byte [rsi]
        sub ecx, '0'
        cmp ecx, 9
        jbe .hex_digit
        movzx ecx, byte [rsi]
        or ecx, 0x20
        sub ecx, 'a'
        cmp ecx, 5
        ja .out
        add ecx, 10
.hex_digit:
        shl rax, 4
        or rax, rcx
        inc rsi
        jmp .hex
.dec:
        movzx ecx, byte [rsi]
        sub ecx, '0'
        cmp ecx, 9
        ja .out
        imul rax, rax, 10
        add rax, rcx
        inc rsi
        jmp .dec
.out:
        pop rcx
        pop rsi
        ret

; rsi, rdi = NUL-terminated strings -> ZF = 1 when equal
streq:
        push rsi
        push rdi
        push rax
.loop:
        mov al, [rsi]
        cmp al, [rdi]
        jne .out
        test al, al
        jz .out
        inc rsi
        inc rdi
        jmp .loop
.out:
        pop rax
        pop rdi
        pop rsi
        ret

; ---------------------------------------------------------------------------------------------------------------
; Console (COM1; the transmitter is assumed ready, so no LSR polling: one `out` per byte)

putc:                                   ; al
        push rdx
        mov edx, PORT_COM1
        out dx, al
        pop rdx
        ret

puts:                                   ; rsi = NUL-terminated string
        push rax
        push rsi
.loop:
        mov al, [rsi]
        test al, al
        jz .out
        call putc
        inc rsi
        jmp .loop
.out:
        pop rsi
        pop rax
        ret

putdec:                                 ; rax, unsigned decimal
        push rax
        push rcx
        push rdx
        push rsi
        sub rsp, 32
        lea rsi, [rsp + 31]
        mov byte [rsi], 0
        mov ecx, 10
.loop:
        xor edx, edx
        div rcx
        add dl, '0'
        dec rsi
        mov [rsi], dl
        test rax, rax
        jnz .loop
        call puts
        add rsp, 32
        pop rsi
        pop rdx
        pop rcx
        pop rax
        ret

puthex:                                 ; rax, "0x" and the significant hex digits
        push rax
        push rcx
        push rdx
        push rsi
        sub rsp, 32
        lea rsi, [rsp + 31]
        mov byte [rsi], 0
        lea rcx, [hex_digits]
.loop:
        mov edx, eax
        and edx, 15
        mov dl, [rcx + rdx]
        dec rsi
        mov [rsi], dl
        shr rax, 4
        jnz .loop
        dec rsi
        mov byte [rsi], 'x'
        dec rsi
        mov byte [rsi], '0'
        call puts
        add rsp, 32
        pop rsi
        pop rdx
        pop rcx
        pop rax
        ret

puthex16:                               ; rax, exactly 16 hex digits, no prefix
        push rax
        push rcx
        push rdx
        push rsi
        lea rsi, [hex_digits]
        mov ecx, 16
.loop:
        rol rax, 4
        mov edx, eax
        and edx, 15
        push rax
        mov al, [rsi + rdx]
        call putc
        pop rax
        dec ecx
        jnz .loop
        pop rsi
        pop rdx
        pop rcx
        pop rax
        ret

print_proto:                            ; "multiboot", "pvh" or "unknown"
        push rsi
        lea rsi, [str_multiboot]
        cmp dword [kinfo + KI_PROTO], PROTO_MULTIBOOT
        je .print
        lea rsi, [str_pvh]
        cmp dword [kinfo + KI_PROTO], PROTO_PVH
        je .print
        lea rsi, [str_unknown]
.print:
        call puts
        pop rsi
        ret

; ---------------------------------------------------------------------------------------------------------------
; Exit device and harness port

exit:                                   ; al = exit status; does not return
        out PORT_EXIT, al
.spin:                                  ; no exit device (or it did not stop us): spin
        jmp .spin

hex_digits:     db "0123456789abcdef"
str_multiboot:  db "multiboot", 0
str_pvh:        db "pvh", 0
str_unknown:    db "unknown", 0
