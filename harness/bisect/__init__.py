"""`pkvm-harness bisect`: find the commit that broke EL2 (build, boot and tests at each step)."""
