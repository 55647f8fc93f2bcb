"""Torch implementations of every kernel: the reference for the triton kernels and the CPU production path."""
