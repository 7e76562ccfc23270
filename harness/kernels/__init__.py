"""Stage 1: kernel specs -> KernelArtifact (Debian fetch, source builds, kconfig, modules, selftest sources)."""
