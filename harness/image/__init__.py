"""Root filesystem assembly: newc cpio written from Python, arm64 packages, init template."""
