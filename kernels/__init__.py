"""Triton kernels and their launchers, imported as mmcore.kernels.

Nothing here imports the rest of mmcore.  One file per op: the @triton.jit functions and the
launchers that set grid, strides and block sizes."""
