# Guest for the QEMU side of the migration benchmarks: a 512-byte boot sector, and a second
# sector that only mode 4 (storage) uses, which the boot sector then loads from its disk.
#
# The BIOS loads the boot sector at 0x7c00 and jumps to it in real mode. In mode 4 it loads
# sector 1 to 0x7e00 and runs it in real mode (see there). Otherwise it switches to 32-bit
# protected mode with flat 4 GiB segments (no paging) and then runs one of four workloads,
# chosen by the parameter block near its end (patched by compare.py before each run):
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
#   mode 4, storage the second sector: idle with the BIOS timer, or a disk (and RAM) writer.
#
# Build (compare.py does this; 1024 bytes):
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
        cmpb    $4, mode                # mode 4 (storage) stays in real mode: load sector 1 and go
        jne     to_pm
        movw    $stage2_dap, %si        # DS:SI = the disk address packet below (LBA 1 -> 0:0x7e00)
        movb    $0x42, %ah              # int 13h extended read; DL is still the boot drive from the BIOS
        int     $0x13
        jc      1f
        jmp     stage2
1:      movb    $'E', %al               # the read failed: say so and stop
        movw    $0x3f8, %dx
        outb    %al, %dx
2:      hlt
        jmp     2b
to_pm:
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
gdt:                                    # entry 0, the null descriptor, is never read by the CPU:
gdtdesc:                                # it holds the descriptor lgdt loads (6 of its 8 bytes)
        .word   gdt_end - gdt - 1       # limit
        .long   gdt                     # base (linear)
        .word   0
        .quad   0x00cf9a000000ffff      # 0x08: code, base 0, limit 4 GiB (G=1), 32-bit, DPL 0
        .quad   0x00cf92000000ffff      # 0x10: data, base 0, limit 4 GiB (G=1), writable
gdt_end:

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
disk_ws:        .word   0               # +20 storage: sectors each pass writes from LBA 2 (0: idle)
disk_chunk:     .word   128             # +22 storage: sectors per int 13h write (at most 128)
stage2_dap:                             # +24 disk address packet of the load of sector 1 (fixed)
        .byte   0x10, 0                 #     packet size, reserved
        .word   1                       #     sectors
        .word   0x7e00, 0               #     buffer offset, segment: right after this sector
        .quad   1                       #     LBA

        .org    0x1fe
        .byte   0x55, 0xaa              # boot signature

# --------------------------------------------------------------------------------------------
# Sector 1, mode 4 (storage): loaded at 0x7e00 by the boot sector, runs in real mode so that
# it can call the BIOS's disk services (int 13h) on the disk it booted from.
#
#   disk_ws == 0  idle: interrupts on, `hlt` until the next interrupt (the BIOS timer, 18.2 Hz),
#                 forever; prints 'T' every 2^report_shift wake-ups. RAM above 1 MiB is never
#                 touched (as in mode 0).
#   disk_ws > 0   writer: pass p (p = 1, 2, ...) fills a 64 KiB buffer at 0x20000 with the
#                 32-bit word p, writes sectors [2, 2 + disk_ws) from it, disk_chunk sectors per
#                 int 13h AH=43h call (extended write) on the boot drive, then, when ws_bytes is
#                 not 0, adds one to the 32-bit counter at offset 0 of every page of
#                 [1 MiB, 1 MiB + ws_bytes) (counters zeroed once at the start), like the busy
#                 walk; prints 'W' every 2^report_shift passes.
#
# The RAM walk runs in "unreal" mode: a moment in protected mode loads DS with the flat data
# descriptor (base 0, limit 4 GiB), and back in real mode DS keeps that limit until it is
# loaded again, so 32-bit addresses reach above 1 MiB. Interrupts are off meanwhile (a BIOS
# handler reloading DS would drop the limit); DS is set back to 0 before the next BIOS call.
#
# On COM1: 'D' (sector 1 running), then 'T' or 'W' as above; 'E' and the int 13h status byte
# if a write fails (then it halts). State lives in registers across the BIOS calls (the BIOS
# preserves all but AX and the flags): EBP passes or wake-ups, BX the report mask, DL the
# drive. Nothing is written into the page holding this code (0x7000-0x7fff): under TCG a store
# there throws the page's translated code away. So the stack is below 0x7000 and the packet of
# the writes is at 0x600.

        .set    wr_dap, 0x600           # disk address packet of the writes (16 bytes)
        .set    wr_lba_end, 0x610       # 2 + disk_ws, the end of the working set
        .set    wr_ram_end, 0x614       # 1 MiB + ws_bytes, the end of the RAM walk
        .set    wr_buf_seg, 0x2000      # the 64 KiB buffer at 0x20000
        .set    wr_first_lba, 2         # sector 0 is the boot sector, 1 this one

        .org    0x200
        .code16
stage2:
        xorw    %ax, %ax
        movw    %ax, %ss
        movw    $0x7000, %sp            # a stack of our own, below this code's page
        movw    %ax, %es
        sti                             # the BIOS wants its interrupts
        movb    $'D', %al
        call    putc16
        movb    report_shift, %cl       # bx = 2^shift - 1: report when (count & bx) == 0
        movw    $1, %bx
        shlw    %cl, %bx
        decw    %bx
        xorl    %ebp, %ebp
        cmpw    $0, disk_ws
        jne     writer
idle16:
        hlt                             # until the next interrupt
        incl    %ebp
        testw   %bx, %bp
        jnz     idle16
        movb    $'T', %al
        call    putc16
        jmp     idle16

writer:
        movw    $wr_dap, %di            # ES:DI = the packet: size 16, disk_chunk sectors,
        movw    $0x0010, %ax            # buffer 0x2000:0000, LBA (set per write), high 48 bits 0
        stosw
        movw    disk_chunk, %ax
        stosw
        xorw    %ax, %ax
        stosw
        movw    $wr_buf_seg, %ax
        stosw
        xorw    %ax, %ax
        movw    $4, %cx
        rep stosw
        movw    disk_ws, %ax
        addw    $wr_first_lba, %ax
        movw    %ax, wr_lba_end
        movl    ws_bytes, %eax
        addl    $0x100000, %eax
        movl    %eax, wr_ram_end
        lgdtl   gdtdesc                 # for the moments in protected mode
        inb     $0x92, %al              # fast A20 on (bit 1), no reset (bit 0), as in mode 0-3
        orb     $0x02, %al
        andb    $0xfe, %al
        outb    %al, $0x92
        call    unreal                  # zero the counters of the RAM working set
        movl    $0x100000, %edi
        jmp     2f
1:      movl    $0, (%edi)
        addl    $4096, %edi
2:      cmpl    wr_ram_end, %edi
        jb      1b
        call    real

wr_pass:
        incl    %ebp                    # pass number
        pushw   $wr_buf_seg             # fill the buffer with it: disk_chunk * 128 words
        popw    %es
        xorw    %di, %di
        movl    %ebp, %eax
        movw    disk_chunk, %cx
        shlw    $7, %cx
        rep stosl
        movw    $wr_first_lba, wr_dap + 8
wr_chunk:
        movw    $wr_dap, %si            # DS:SI = packet; DL = drive
        movw    $0x4300, %ax            # extended write, AL 0: no verify
        int     $0x13
        jc      disk_error
        movw    wr_dap + 2, %ax         # next chunk
        addw    %ax, wr_dap + 8
        movw    wr_dap + 8, %ax
        cmpw    wr_lba_end, %ax
        jb      wr_chunk

        call    unreal                  # the RAM walk: one store per page
        movl    $0x100000, %edi
        jmp     2f
1:      addl    $1, (%edi)
        addl    $4096, %edi
2:      cmpl    wr_ram_end, %edi
        jb      1b
        call    real

        testw   %bx, %bp
        jnz     wr_pass
        movb    $'W', %al
        call    putc16
        jmp     wr_pass

disk_error:
        movb    $'E', %al
        call    putc16
        movb    %ah, %al                # the int 13h status
        call    putc16
        cli
1:      hlt
        jmp     1b

# DS = flat 4 GiB data segment (base 0) in real mode; interrupts off until `real`.
unreal:
        cli
        movl    %cr0, %eax
        orb     $1, %al                 # CR0.PE
        movl    %eax, %cr0
        movw    $0x10, %ax              # the flat data descriptor: loads base 0, limit 4 GiB
        movw    %ax, %ds
        movl    %cr0, %eax
        andb    $0xfe, %al              # back to real mode; DS keeps its 4 GiB limit
        movl    %eax, %cr0
        ret

# DS = 0 as real mode knows it (64 KiB limit), interrupts on.
real:
        xorw    %ax, %ax
        movw    %ax, %ds
        sti
        ret

# Write AL to COM1 from real mode (DX is preserved: DL is the drive).
putc16:
        pushw   %dx
        movw    $0x3f8, %dx
        outb    %al, %dx
        popw    %dx
        ret

        .org    0x400                   # sector 1 is padded to its full 512 bytes
