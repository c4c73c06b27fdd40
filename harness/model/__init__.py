"""Pure-Python reference models of pKVM hypervisor data structures (no I/O)."""

from harness.model.buddy import PAGE_SIZE, BuddyBug, HypPool, VersionRules, get_order, version_rules

__all__ = ["PAGE_SIZE", "BuddyBug", "HypPool", "VersionRules", "get_order", "version_rules"]
