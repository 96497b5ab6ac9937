"""Triton kernels of dapo-mcore (GPU path), importable as ``dapo_kernels``.

Run on CPU tensors only under ``TRITON_INTERPRET=1`` (tests); the CPU production path is the
C++ library in ``csrc/``.
"""
