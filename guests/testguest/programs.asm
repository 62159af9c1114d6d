; vmfork test guest: the programs, chosen by the first word of the command line. All run in CPL3.

prog_table:
        dq name_hello, prog_hello
        dq name_timer, prog_timer
        dq name_pattern, prog_pattern
        dq name_demo, prog_demo
        dq name_loop, prog_loop
        dq name_det, prog_det
        dq name_fault, prog_fault
        dq name_xrstor, prog_xrstor
        dq name_ud2, prog_ud2
        dq name_reboot, prog_reboot
        dq name_vmi, prog_vmi
        dq name_fuzz, prog_fuzz
        dq name_hostile, prog_hostile
%ifdef WITH_JSMN
        dq name_jsmn, prog_jsmn
%endif
        dq 0, 0

name_hello:     db "hello", 0
name_timer:     db "timer", 0
name_pattern:   db "pattern", 0
name_demo:      db "demo", 0
name_loop:      db "loop", 0
name_det:       db "det", 0
name_fault:     db "fault", 0
name_xrstor:    db "xrstor", 0
name_ud2:       db "ud2", 0
name_reboot:    db "reboot", 0
name_vmi:       db "vmi", 0
name_fuzz:      db "fuzz", 0
name_hostile:   db "hostile", 0
%ifdef WITH_JSMN
name_jsmn:      db "jsmn", 0
%endif

; ---------------------------------------------------------------------------------------------------------------
; hello: "vmfork-guest: hello <protocol> ram=<MiB>MiB", "vmfork-guest: ready", exit 0
prog_hello:
        PRINT "vmfork-guest: hello "
        call print_proto
        PRINT " ram="
        mov rax, [kinfo + KI_RAM_MIB]
        call putdec
        PRINT "MiB", 10
        PRINT "vmfork-guest: ready", 10
        xor eax, eax
        jmp exit

; ---------------------------------------------------------------------------------------------------------------
; timer [ms=100] [count=1000000]: periodic LAPIC timer with initial count `count` (divide by 1), busy-wait `ms`
; milliseconds of TSC time in CPL3, stop the timer, print the ticks seen. The TSC rate: see tsc_khz.
prog_timer:
        ARG r12, 0, 100
        ARG r13, 1, DEFAULT_TIMER_COUNT
        call tsc_khz
        mov r14, rax
        mov [kinfo + KI_TSC_KHZ], rax
        mov rax, r12
        mul r14
        mov r15, rax                    ; TSC cycles to wait
        mov rdi, r13
        mov eax, SVC_TIMER_START
        int3
        rdtsc
        shl rdx, 32
        or rax, rdx
        mov rbx, rax
.wait:
        rdtsc
        shl rdx, 32
        or rax, rdx
        sub rax, rbx
        cmp rax, r15
        jb .wait
        mov eax, SVC_TIMER_STOP
        int3
        PRINT "vmfork-guest: timer ms="
        mov rax, r12
        call putdec
        PRINT " count="
        mov rax, r13
        call putdec
        PRINT " tsc_khz="
        mov rax, r14
        call putdec
        PRINT 10, "ticks="
        mov rax, [kinfo + KI_TICKS]
        call putdec
        PRINT 10
        xor eax, eax
        jmp exit

; -> rax = TSC rate in kHz: CPUID 0x40000010 EAX (the hypervisor timing leaf, in kHz), else 0x15
; (crystal Hz * EBX / EAX), else 0x16 (base MHz), else 2 GHz. All CPUID through the kernel (kcpuid).
tsc_khz:
        push rbx
        push rcx
        push rdx
        push rdi
        push r8
        push r9
        test dword [kinfo + KI_CPUID1_ECX], 1 << 31
        jz .basic
        mov edi, 0x40000000
        xor ecx, ecx
        call kcpuid
        cmp eax, 0x40000010
        jb .basic
        cmp eax, 0x400000ff
        ja .basic
        mov edi, 0x40000010
        xor ecx, ecx
        call kcpuid
        test eax, eax
        jnz .out
.basic:
        xor edi, edi
        xor ecx, ecx
        call kcpuid
        mov r8d, eax                    ; highest basic leaf
        cmp r8d, 0x15
        jb .leaf16
        mov edi, 0x15
        xor ecx, ecx
        call kcpuid                     ; EAX = denominator, EBX = numerator, ECX = crystal Hz
        test eax, eax
        jz .leaf16
        test ebx, ebx
        jz .leaf16
        test ecx, ecx
        jz .leaf16
        mov r9d, eax
        mov eax, ecx
        mul rbx
        div r9
        xor edx, edx
        mov ecx, 1000
        div rcx
        test rax, rax
        jnz .out
.leaf16:
        cmp r8d, 0x16
        jb .default
        mov edi, 0x16
        xor ecx, ecx
        call kcpuid                     ; EAX = base frequency, MHz
        and eax, 0xffff
        jz .default
        imul eax, eax, 1000
        jmp .out
.default:
        mov eax, 2000000
.out:
        pop r9
        pop r8
        pop rdi
        pop rdx
        pop rcx
        pop rbx
        ret

; ---------------------------------------------------------------------------------------------------------------
; pattern [seed=1] [MiB=16]: from PATTERN_ADDR write MiB MiB of qwords x1, x2, ... where x0 = seed (or
; DEFAULT_SEED when 0) and x(i+1) = xorshift64(x(i)); then read them back into
; checksum = FNV-1a-64 over qwords (c = (c ^ q) * FNV_PRIME). MiB is clamped to the RAM above PATTERN_ADDR.
prog_pattern:
        ARG r12, 0, 1
        ARG r13, 1, 16
        mov rax, [kinfo + KI_RAM_LOW_TOP]
        test rax, rax
        jz .clamped
        sub rax, PATTERN_ADDR
        jae .room
        xor eax, eax
.room:
        shr rax, 20
        cmp r13, rax
        jbe .clamped
        mov r13, rax
.clamped:
        PRINT "vmfork-guest: pattern seed="
        mov rax, r12
        call putdec
        PRINT " mib="
        mov rax, r13
        call putdec
        PRINT 10
        mov rax, r12
        test rax, rax
        jnz .seeded
        mov rax, DEFAULT_SEED
.seeded:
        mov edi, PATTERN_ADDR
        mov rcx, r13
        shl rcx, 17                     ; qwords
        jz .sum
.write:
        XORSHIFT rax, rdx
        mov [rdi], rax
        add rdi, 8
        dec rcx
        jnz .write
.sum:
        mov edi, PATTERN_ADDR
        mov rcx, r13
        shl rcx, 17
        mov rax, FNV_OFFSET
        mov r8, FNV_PRIME
        test rcx, rcx
        jz .print
.read:
        xor rax, [rdi]
        imul rax, r8
        add rdi, 8
        dec rcx
        jnz .read
.print:
        PRINT "checksum="
        call puthex16
        PRINT 10
        xor eax, eax
        jmp exit

; ---------------------------------------------------------------------------------------------------------------
; demo: banner, "vmfork-guest: ready", ready marker. Then input = u64 length + bytes at INBUF_ADDR (length clamped
; to INBUF_SIZE - 8); h = FNV-1a-64 of the bytes; count the primes below (h % 50000) + 1000 by trial division;
; print "result: len=<n> fnv=<16 hex> primes=<n>"; exit status h & 0x3f.
prog_demo:
        PRINT "vmfork-guest: demo on "
        call print_proto
        PRINT " ram="
        mov rax, [kinfo + KI_RAM_MIB]
        call putdec
        PRINT "MiB: send bytes, get their FNV-1a hash and some prime counting", 10
        PRINT "vmfork-guest: ready", 10
        READY_MARKER
        mov esi, INBUF_ADDR
        mov r12, [rsi]
        cmp r12, INBUF_SIZE - 8
        jbe .len_ok
        mov r12d, INBUF_SIZE - 8
.len_ok:
        add rsi, 8
        mov rcx, r12
        mov rax, FNV_OFFSET
        mov r8, FNV_PRIME
        test rcx, rcx
        jz .hashed
.hash:
        movzx edx, byte [rsi]
        xor rax, rdx
        imul rax, r8
        inc rsi
        dec rcx
        jnz .hash
.hashed:
        mov r13, rax
        xor edx, edx
        mov ecx, 50000
        div rcx
        lea rdi, [rdx + 1000]
        call count_primes_below
        mov r14, rax
        PRINT "result: len="
        mov rax, r12
        call putdec
        PRINT " fnv="
        mov rax, r13
        call puthex16
        PRINT " primes="
        mov rax, r14
        call putdec
        PRINT 10
        mov eax, r13d
        and eax, 0x3f
        jmp exit

; rdi = n -> rax = number of primes p < n (trial division)
count_primes_below:
        push rcx
        push rdx
        push r8
        push r9
        xor r8d, r8d                    ; count
        mov r9d, 2                      ; candidate
.candidate:
        cmp r9, rdi
        jae .done
        mov ecx, 2
.divisor:
        mov rax, rcx
        mul rcx
        cmp rax, r9
        ja .prime
        mov rax, r9
        xor edx, edx
        div rcx
        test rdx, rdx
        jz .next
        inc rcx
        jmp .divisor
.prime:
        inc r8
.next:
        inc r9
        jmp .candidate
.done:
        mov rax, r8
        pop r9
        pop r8
        pop rdx
        pop rcx
        ret

; ---------------------------------------------------------------------------------------------------------------
; loop: "vmfork-guest: ready", then forever: ready marker; input = u64 npages, u64 seed; write seed ^ i into the
; first qword of page i of the scratch area (SCRATCH_ADDR + i * 4096) for i < npages (clamped to
; SCRATCH_MAX_PAGES and to the RAM above SCRATCH_ADDR); end marker. Between the markers nothing is read from memory
; but the input buffer and the boot-time RAM size, and nothing touches the stack.
prog_loop:
        PRINT "vmfork-guest: ready", 10
.iteration:
        READY_MARKER
        mov esi, INBUF_ADDR
        mov rcx, [rsi]                  ; npages
        mov r12, [rsi + 8]              ; seed
        cmp rcx, SCRATCH_MAX_PAGES
        jbe .max_ok
        mov ecx, SCRATCH_MAX_PAGES
.max_ok:
        mov rax, [kinfo + KI_RAM_LOW_TOP]
        test rax, rax
        jz .clamped
        sub rax, SCRATCH_ADDR
        jae .room
        xor eax, eax
.room:
        shr rax, 12
        cmp rcx, rax
        jbe .clamped
        mov rcx, rax
.clamped:
        mov [kinfo + KI_LOOP_NPAGES], rcx
        mov edi, SCRATCH_ADDR
        xor edx, edx
        test rcx, rcx
        jz .touched
.touch:
        mov rax, r12
        xor rax, rdx
        mov [rdi], rax
        add rdi, 4096
        inc rdx
        cmp rdx, rcx
        jb .touch
.touched:
        inc qword [kinfo + KI_LOOP_ITER]
        END_MARKER
        jmp .iteration

; ---------------------------------------------------------------------------------------------------------------
; det [n=10]: "vmfork-guest: ready", ready marker, then n lines "det <i> <16 hex>" of an xorshift64 sequence
; whose state lives at KI_DET_STATE, seeded from the first u64 of the input buffer (0: DEFAULT_SEED); exit 0.
; Nothing depends on time, so two forks given the same input print the same lines.
prog_det:
        ARG r12, 0, 10
        PRINT "vmfork-guest: ready", 10
        READY_MARKER
        mov esi, INBUF_ADDR
        mov rax, [rsi]
        test rax, rax
        jnz .seeded
        mov rax, DEFAULT_SEED
.seeded:
        mov [kinfo + KI_DET_STATE], rax
        xor r13d, r13d
.line:
        cmp r13, r12
        jae .done
        mov rax, [kinfo + KI_DET_STATE]
        XORSHIFT rax, rdx
        mov [kinfo + KI_DET_STATE], rax
        PRINT "det "
        xchg rax, r13
        call putdec
        xchg rax, r13
        PRINT " "
        call puthex16
        PRINT 10
        inc r13
        jmp .line
.done:
        xor eax, eax
        jmp exit

; ---------------------------------------------------------------------------------------------------------------
; fault: triple fault through SVC_TRIPLE_FAULT. xrstor: SVC_XRSTOR. Both print a line first; if the service
; returns (xrstor on real CPUs and QEMU), they say so and exit 0x7e.
prog_fault:
        PRINT "vmfork-guest: triple fault", 10
        mov eax, SVC_TRIPLE_FAULT
        int3
        PRINT "vmfork-guest: still running after the triple fault service", 10
        mov al, 0x7e
        jmp exit

prog_xrstor:
        PRINT "vmfork-guest: xrstor in CPL0", 10
        mov eax, SVC_XRSTOR
        int3
        PRINT "vmfork-guest: xrstor returned", 10
        mov al, 0x7e
        jmp exit

; ud2: #UD in CPL3, reported by the kernel as "EXCEPTION vec=6 ..." with exit status 0x86
prog_ud2:
        PRINT "vmfork-guest: ud2 in CPL3", 10
        ud2

; reboot: the i8042 reset pulse (command 0xfe to port 0x64), as a PC kernel reboots. Ports below 0x400 are open to
; CPL3 (the TSS I/O bitmap). A machine with no i8042 ignores it: the program then exits with 0x7e.
prog_reboot:
        PRINT "vmfork-guest: reboot", 10
        mov al, 0xfe
        out 0x64, al
        PRINT "vmfork-guest: still running after the reset pulse", 10
        mov al, 0x7e
        jmp exit

prog_unknown:
        PRINT "vmfork-guest: unknown program: "
        call puts
        PRINT 10
        mov al, 0x7f
        jmp exit

; ---------------------------------------------------------------------------------------------------------------
; vmi [n=3]: for introspection (breakpoints, stepping, the GDB server). Prints
; "vmfork-guest: vmi n=<n> target=0x<address of vmi_target>" and "vmfork-guest: ready", ready marker; then
; sum = vmi_target(0) + ... + vmi_target(n - 1), then one kernel service call through the guest's own `int3` (an
; unknown service, so RAX = -1 comes back), prints "vmfork-guest: vmi sum=<sum> svc=<RAX, 16 hex digits>", exit 0.
prog_vmi:
        ARG r12, 0, 3
        PRINT "vmfork-guest: vmi n="
        mov rax, r12
        call putdec
        PRINT " target="
        lea rax, [vmi_target]
        call puthex
        PRINT 10, "vmfork-guest: ready", 10
        READY_MARKER
        xor ebx, ebx                    ; sum
        xor r13d, r13d                  ; i
.next:
        cmp r13, r12
        jae .done
        mov rdi, r13
        call vmi_target
        add rbx, rax
        inc r13
        jmp .next
.done:
        mov eax, 0x7f                   ; no such service: the guest's #BP handler returns RAX = -1
        int3
        mov r14, rax
        PRINT "vmfork-guest: vmi sum="
        mov rax, rbx
        call putdec
        PRINT " svc="
        mov rax, r14
        call puthex16
        PRINT 10
        xor eax, eax
        jmp exit

; rdi = i -> rax = i * i + 1. A user-mode function to break on and step through: mov (3 bytes), imul (4),
; inc (3), ret (1).
vmi_target:
        mov rax, rdi
        imul rax, rdi
        inc rax
        ret

; ---------------------------------------------------------------------------------------------------------------
; fuzz: an example fuzzing target. Prints "vmfork-guest: fuzz parse=0x<fuzz_parse> end=0x<fuzz_parse_end>" and
; "vmfork-guest: ready"; then forever: ready marker; input = u64 length + that many bytes (length clamped to
; INBUF_SIZE - 8); fuzz_parse(data, length); end marker; back to the ready marker (like `loop`).
; fuzz_parse: inputs shorter than 4 bytes and those not starting with "FUZZ" are ignored, except that "HANG"
; spins forever (a hang). After "FUZZ" come 2-byte records (type, value) up to the end of the input:
; 'A' adds the value to a sum, 'C' counts, 'B' stores into bank <value> of a table: the planted bug, the signed
; bank number is not bounds-checked and each bank is 4 GiB apart, so any nonzero value writes outside the mapped
; 4 GiB (#PF, vector 14: "EXCEPTION vec=14", exit status 0x8e). 'T' with value 'F' calls the kernel's triple-fault
; service (the machine shuts down: a crash with no exception report). Any other type ends the parse. The sum, count
; and table live at FUZZ_DATA (0x900000).
FUZZ_DATA       equ 0x00900000
; `fuzz [markers=0]`: how an iteration is marked. 0: the harness port (READY_MARKER, END_MARKER). 1: KF/x-style
; breakpoint-harness markers, `int3` with RAX = FUZZ_INT3_START (RDI/RSI = the buffer, like READY_MARKER) or
; FUZZ_INT3_END (without a VMM watching, the kernel answers them as unknown services and the loop goes on). 2: no
; markers at all, the loop parses the buffer forever (for start/end breakpoints at prog_fuzz.input/prog_fuzz.done).
; Every mode starts an iteration at prog_fuzz.input (where the input is first read) and ends it at prog_fuzz.done.
FUZZ_INT3_START equ 0x13371337
FUZZ_INT3_END   equ 0x13371338
prog_fuzz:
        ARG r12, 0, 0                   ; markers (kept in r12: fuzz_parse preserves it)
        PRINT "vmfork-guest: fuzz parse="
        lea rax, [fuzz_parse]
        call puthex
        PRINT " end="
        lea rax, [fuzz_parse_end]
        call puthex
        PRINT 10, "vmfork-guest: ready", 10
.iteration:
        cmp r12, 1
        je .int3_start
        ja .input
        READY_MARKER
        jmp .input
.int3_start:
        mov edi, INBUF_ADDR
        mov esi, INBUF_SIZE
        mov eax, FUZZ_INT3_START
        int3
.input:
        INPUT_ARGS
        call fuzz_parse
.done:
        cmp r12, 1
        je .int3_end
        ja .iteration
        END_MARKER
        jmp .iteration
.int3_end:
        mov eax, FUZZ_INT3_END
        int3
        jmp .iteration

; rdi = data, rcx = length. Clobbers rax, rbx, rdx, rsi.
fuzz_parse:
        cmp rcx, 4
        jb .done
        cmp dword [rdi], 'HANG'
        jne .not_hang
.hang:
        jmp .hang
.not_hang:
        cmp byte [rdi], 'F'
        jne .done
        cmp byte [rdi + 1], 'U'
        jne .done
        cmp byte [rdi + 2], 'Z'
        jne .done
        cmp byte [rdi + 3], 'Z'
        jne .done
        lea rsi, [rdi + 4]
        lea rdx, [rdi + rcx]
.record:
        lea rax, [rsi + 2]
        cmp rax, rdx
        ja .done
        movzx eax, byte [rsi]
        movzx ebx, byte [rsi + 1]
        add rsi, 2
        cmp al, 'A'
        je .add
        cmp al, 'B'
        je .bank
        cmp al, 'C'
        je .count
        cmp al, 'T'
        je .triple
        jmp .done
.triple:
        cmp bl, 'F'                     ; "TF": the kernel's triple-fault service, a crash KVM reports as a shutdown
        jne .done
        mov eax, SVC_TRIPLE_FAULT
        int3                            ; never returns
        jmp .done
.add:
        add [abs FUZZ_DATA], rbx
        jmp .record
.count:
        inc qword [abs FUZZ_DATA + 8]
        jmp .record
.bank:
        movsx rbx, bl                   ; the bug: a signed bank number, never checked
        shl rbx, 32
        mov [FUZZ_DATA + 16 + rbx], rax
        jmp .record
.done:
        ret
fuzz_parse_end:

%ifdef WITH_JSMN
; ---------------------------------------------------------------------------------------------------------------
; jsmn (jsmn images only): the fuzzing example on a third-party parser, Debian's jsmn with a planted bug
; (guests/jsmn/). Prints "vmfork-guest: jsmn parse=0x<start> end=0x<end>" (the C code, for `--cover auto`),
; in the jsmn-afl image "vmfork-guest: jsmn afl-map=0x<map> size=0x<bytes>" (the C code's edge map, for
; `--afl-map auto`), and "vmfork-guest: ready"; then forever: ready marker; input = u64 length + that many bytes (length clamped to
; INBUF_SIZE - 8); fuzz_json(data, length), a C function (SysV ABI) in CPL3 like everything here; end marker; back to
; the ready marker. A stack overflow caught by the C code's canary ends in `ud2`: "EXCEPTION vec=6 rip=<in the C
; code>", exit status 0x86.
prog_jsmn:
        PRINT "vmfork-guest: jsmn parse="
        mov eax, JSMN_TEXT_START
        call puthex
        PRINT " end="
        mov eax, JSMN_TEXT_END
        call puthex
%ifdef JSMN_AFL_MAP
        ; jsmn-afl image: where the C code's edge map is (guests/jsmn/afl_cov.c), for `vmfork fuzz --afl-map auto`.
        ; Nothing to initialise: the map is in the zeroed .bss, and the instrumentation needs no guards.
        PRINT 10, "vmfork-guest: jsmn afl-map="
        mov eax, JSMN_AFL_MAP
        call puthex
        PRINT " size="
        mov eax, JSMN_AFL_MAP_SIZE
        call puthex
%endif
        PRINT 10, "vmfork-guest: ready", 10
        and rsp, -16                    ; the ABI's alignment at a call; nothing is ever popped from here on
.iteration:
        READY_MARKER
        INPUT_ARGS
        mov rsi, rcx
        call JSMN_TEXT_START            ; fuzz_json(data, length): may clobber every caller-saved register
        END_MARKER
        jmp .iteration
%endif

%include "hostile.asm"
