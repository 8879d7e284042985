/* Multiboot (v1) entry: QEMU's -kernel loader finds this header, loads the
 * ELF32 segments at 1 MiB and jumps to _start in 32-bit protected mode with
 * the multiboot info pointer in %ebx. */
	.set MB_MAGIC, 0x1BADB002
	.set MB_FLAGS, 0x00000003          /* page-align modules, want memory info */

	.section .multiboot, "a"
	.align 4
	.long MB_MAGIC
	.long MB_FLAGS
	.long -(MB_MAGIC + MB_FLAGS)

	.section .text
	.global _start
_start:
	cli
	mov $stack_top, %esp
	push %ebx
	push %eax
	call guest_main
1:	cli
	hlt
	jmp 1b

	.section .bss
	.align 16
	.skip 16384
stack_top:
	.section .note.GNU-stack, "", @progbits
