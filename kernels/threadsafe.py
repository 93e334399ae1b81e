"""Imported by every module with parallel kernels, before any of them runs: Numba's threading layer.

ktq launches parallel kernels from two threads at once (decoding on the read thread while the main one
quantises). Numba's fallback workqueue layer aborts the process on that; "threadsafe" takes OpenMP or TBB and
raises a clear error (ktq.app) where neither loads. An explicit NUMBA_THREADING_LAYER is the user's choice.
Not in the package's __init__: ktformat (the format rules, imported by the GPU path too) must not pull in Numba.
"""

import os

import numba

if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "threadsafe"
