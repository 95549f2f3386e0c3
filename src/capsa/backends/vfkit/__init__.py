"""The vfkit backend (macOS Virtualization.framework through the vfkit tool)."""
