"""Everything that talks to a machine under test: QEMU processes and their consoles."""
