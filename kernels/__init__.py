"""Numba kernels of ktq, installed as ktq.kernels: pure functions over numpy arrays, no I/O, no ktq imports."""
