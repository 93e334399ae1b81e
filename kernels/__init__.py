"""Numba kernels of ktq, installed as ktq.kernels: pure functions over numpy arrays, no I/O, no ktq imports."""

import os

import numba

# ktq launches parallel kernels from two threads at once (decoding on the read thread while the main one
# quantises). Numba's fallback workqueue layer aborts the process on that; "threadsafe" takes OpenMP or TBB and
# raises a clear error (ktq.app) where neither loads. An explicit NUMBA_THREADING_LAYER is the user's choice.
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "threadsafe"
