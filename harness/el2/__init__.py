"""Reading EL2's state from outside the guest (QEMU only): physical memory over QMP, symbols."""
