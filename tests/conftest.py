"""Suite-wide setup.

Without CUDA the Triton kernels run under Triton's interpreter. `triton.jit` reads `TRITON_INTERPRET`
when a kernel is *defined*, so it must be set here, before any test module imports `avq.kernels`, for
the whole suite to see the same mode.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
