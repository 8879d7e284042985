/* Multiboot (v1) entry and interrupt stubs. QEMU's -kernel loader finds the
 * header, loads the ELF32 segments at 1 MiB and jumps to _start in 32-bit
 * protected mode with the multiboot info pointer in %ebx. The guest then
 * runs on its own GDT and IDT, so nothing it needs lives in firmware memory. */
	.set MB_MAGIC, 0x1BADB002
	.set MB_FLAGS, 0x00000003          /* page-align modules, want memory info */

	.section .multiboot, "a"
	.align 4
	.long MB_MAGIC
	.long MB_FLAGS
	.long -(MB_MAGIC + MB_FLAGS)

	.section .rodata
	.align 8
gdt:
	.quad 0
	.quad 0x00cf9a000000ffff           /* 0x08: flat 32-bit code */
	.quad 0x00cf92000000ffff           /* 0x10: flat 32-bit data */
gdt_end:
	.global gdt_descriptor
gdt_descriptor:
	.word gdt_end - gdt - 1
	.long gdt

	.section .text
	.global _start
_start:
	cli
	mov $stack_top, %esp
	push %ebx
	push %eax
	lgdt gdt_descriptor
	ljmp $0x08, $1f
1:	mov $0x10, %cx
	mov %cx, %ds
	mov %cx, %es
	mov %cx, %ss
	mov %cx, %fs
	mov %cx, %gs
	call guest_main
2:	cli
	hlt
	jmp 2b

	.global irq_timer, irq_serial, irq_ignore
irq_timer:
	pushal
	call on_timer
	movb $0x20, %al
	outb %al, $0x20
	popal
	iret
irq_serial:
	pushal
	call on_serial
	movb $0x20, %al
	outb %al, $0x20
	popal
	iret
irq_ignore:
	iret

	.section .bss
	.align 16
	.skip 16384
stack_top:

	.section .note.GNU-stack, "", @progbits
