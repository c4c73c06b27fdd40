"""Kernel source, configuration, build and artifact cache."""
