# Guest for the QEMU side of the pre-copy benchmark: one 512-byte boot sector, no image.
#
# The BIOS loads it at 0x7c00 and jumps to it in real mode. It switches to 32-bit protected
# mode with flat 4 GiB segments (no paging) and then runs one of four workloads, chosen by
# the parameter block near its end (patched by compare.py before each run):
#
#   mode 0, idle    RAM above 1 MiB is left as QEMU gave it (zero); the vCPU halts for good.
#   mode 1, random  fills [1 MiB, ram_end) with xorshift32 output once, then halts.
#   mode 2, busy    optionally fills [1 MiB, ram_end) like mode 1, zeroes a 32-bit counter at
#                   offset 0 of every page of the working set [1 MiB, 1 MiB + ws_bytes), then
#                   walks that working set forever adding one to each page's counter, like
#                   vmm-demo's guest (which adds to a 64-bit counter; one store per page
#                   either way).
#   mode 3, scatter fills [1 MiB, ram_end) like mode 1, then touches pseudo-random pages of
#                   [1 MiB, ram_end) forever: touch n (n = 1, 2, ...) stores n at the fixed
#                   address touch_count, then n into the first word of page
#                   1 MiB + 4096 * (x mod pages), x the next xorshift32 value. After a switch
#                   to post-copy almost every touch is of a page the destination lacks.
#
# Serial port 0x3f8, one byte per event, so that the harness waits on a condition:
#   'A'  entered protected mode          '+'  16 MiB more of RAM filled
#   'F'  fill complete                   'H'  halting for good (idle, random)
#   'B'  every 2^report_shift passes of the busy walk
#   'S'  every 2^report_shift touches of the scatter loop (n & (2^report_shift - 1) == 0)
#
# Build (compare.py does this):
#   as --32 -o bootblock.o bootblock.s
#   ld -m elf_i386 -Ttext=0x7c00 --oformat binary -o bootblock.bin bootblock.o
#
# Written for this project; the overall shape (real mode -> lgdt -> protected mode -> walk
# pages, report on COM1) is the one QEMU's own migration tests use for their guest.

        .code16
        .text
        .globl  _start
_start:
        cli
        cld
        xorw    %ax, %ax
        movw    %ax, %ds                # lgdt below reads DS:gdtdesc; the BIOS need not leave DS 0
        lgdtl   gdtdesc                 # 32-bit operand size: take all 32 bits of the GDT base
        movl    %cr0, %eax
        orl     $1, %eax                # CR0.PE
        movl    %eax, %cr0
        ljmpl   $0x08, $pm32            # far jump loads CS from the GDT: now 32-bit code

        .code32
pm32:
        movw    $0x10, %ax              # flat data segment for everything else
        movw    %ax, %ds
        movw    %ax, %es
        movw    %ax, %ss
        movl    $0x7c00, %esp           # stack grows down below the boot sector (unused but sane)

        inb     $0x92, %al              # "fast A20": set bit 1 so addresses above 1 MiB are not
        orb     $0x02, %al              # wrapped; keep bit 0 clear (it would reset the CPU)
        andb    $0xfe, %al
        outb    %al, $0x92

        movb    $'A', %al
        call    putc

        movb    mode, %al
        cmpb    $1, %al
        je      do_random
        cmpb    $2, %al
        je      do_busy
        cmpb    $3, %al
        je      do_scatter
        # anything else: idle
halt_forever:
        movb    $'H', %al
        call    putc
1:      hlt                             # IF is clear, so only NMI/SMI/reset would wake us
        jmp     1b

do_random:
        call    fill
        jmp     halt_forever

do_busy:
        cmpb    $0, busy_fill
        je      1f
        call    fill
1:
        movl    $0x100000, %edi         # working set starts at 1 MiB
        movl    %edi, %ebx
        addl    ws_bytes, %ebx          # ebx = end of the working set
2:      movl    $0, (%edi)              # counters start from 0 whatever the fill left
        addl    $4096, %edi
        cmpl    %ebx, %edi
        jb      2b

        movb    report_shift, %cl       # esi = 2^shift - 1: report when (pass & esi) == 0
        movl    $1, %esi
        shll    %cl, %esi
        decl    %esi
        xorl    %ebp, %ebp              # ebp = passes done
busy_pass:
        movl    $0x100000, %edi
3:      addl    $1, (%edi)              # the write that dirties the page
        addl    $4096, %edi
        cmpl    %ebx, %edi
        jb      3b
        incl    %ebp
        testl   %esi, %ebp
        jnz     busy_pass
        movb    $'B', %al
        call    putc
        jmp     busy_pass

# Scatter: touch one word of a pseudo-random page of [1 MiB, ram_end), forever.
# Registers: esi = xorshift32 state, ebx = number of pages, edi = report mask, ebp = touches.
do_scatter:
        call    fill
        movl    ram_end, %ebx
        subl    $0x100000, %ebx
        shrl    $12, %ebx               # ebx = pages in [1 MiB, ram_end), the divisor below
        movb    report_shift, %cl       # edi = 2^shift - 1: report when (n & edi) == 0
        movl    $1, %edi
        shll    %cl, %edi
        decl    %edi
        movl    seed, %esi              # a stream apart from the fill's: seed ^ golden ratio
        xorl    $0x9e3779b9, %esi
        jnz     1f
        incl    %esi                    # xorshift has a fixed point at 0
1:      xorl    %ebp, %ebp              # ebp = touches done
        movl    %ebp, touch_count
scatter_touch:
        movl    %esi, %eax              # x ^= x << 13
        shll    $13, %eax
        xorl    %eax, %esi
        movl    %esi, %eax              # x ^= x >> 17
        shrl    $17, %eax
        xorl    %eax, %esi
        movl    %esi, %eax              # x ^= x << 5
        shll    $5, %eax
        xorl    %eax, %esi
        movl    %esi, %eax
        xorl    %edx, %edx
        divl    %ebx                    # edx = x mod pages (the bias of 2^32 mod pages is tiny)
        shll    $12, %edx               # edx = offset of that page from 1 MiB
        incl    %ebp
        movl    %ebp, touch_count       # the count first, then the touch it counts
        movl    %ebp, 0x100000(%edx)    # the touch: one word, a write
        testl   %edi, %ebp
        jnz     scatter_touch
        movb    $'S', %al
        call    putc
        jmp     scatter_touch

# Fill [1 MiB, ram_end) with xorshift32 (13/17/5) words, seeded from the parameter block.
# One '+' per 16 MiB. Clobbers eax, ecx, edx, edi.
fill:
        movl    seed, %eax
        orl     %eax, %eax
        jnz     1f
        incl    %eax                    # xorshift has a fixed point at 0
1:      movl    $0x100000, %edi
fill_mib:
        movl    %edi, %ecx
        addl    $0x100000, %ecx         # ecx = end of this MiB
2:      movl    %eax, %edx              # x ^= x << 13
        shll    $13, %edx
        xorl    %edx, %eax
        movl    %eax, %edx              # x ^= x >> 17
        shrl    $17, %edx
        xorl    %edx, %eax
        movl    %eax, %edx              # x ^= x << 5
        shll    $5, %edx
        xorl    %edx, %eax
        movl    %eax, (%edi)
        addl    $4, %edi
        cmpl    %ecx, %edi
        jb      2b
        testl   $0x00ffffff, %edi       # another 16 MiB done?
        jnz     3f
        pushl   %eax
        movb    $'+', %al
        call    putc
        popl    %eax
3:      cmpl    ram_end, %edi
        jb      fill_mib
        movb    $'F', %al
        call    putc
        ret

# Write AL to COM1. QEMU's UART takes a byte at any time, so no LSR polling.
putc:
        pushl   %edx
        movw    $0x3f8, %dx
        outb    %al, %dx
        popl    %edx
        ret

# Touches done by the scatter loop, at a fixed address the harness reads with pmemsave. Not in
# this sector's own page: under TCG a store to a page holding translated code is slow.
        .set    touch_count, 0x10000

        .p2align 3
gdt:    .quad   0                       # null descriptor
        .quad   0x00cf9a000000ffff      # 0x08: code, base 0, limit 4 GiB (G=1), 32-bit, DPL 0
        .quad   0x00cf92000000ffff      # 0x10: data, base 0, limit 4 GiB (G=1), writable
gdtdesc:
        .word   gdtdesc - gdt - 1       # limit
        .long   gdt                     # base (linear)

# Parameter block, found by its magic and patched by compare.py. Little-endian.
        .org    0x1c0
params:
        .ascii  "QMB1"                  # +0  magic and layout version
mode:           .byte   0               # +4  0 idle, 1 random, 2 busy, 3 scatter
busy_fill:      .byte   1               # +5  busy: 1 fill RAM with random data first, 0 leave zero
report_shift:   .byte   8               # +6  print 'B' every 2^report_shift passes (busy),
                                        #     'S' every 2^report_shift touches (scatter)
                .byte   0               # +7  reserved
ram_end:        .long   0x10000000      # +8  end of the fill and the scatter, exclusive (256 MiB)
ws_bytes:       .long   0x01000000      # +12 busy working set (16 MiB), a multiple of 4096
seed:           .long   0x2545f491      # +16 xorshift32 seed (0 is replaced by 1)

        .org    0x1fe
        .byte   0x55, 0xaa              # boot signature
