"""Inference kernels behind `AQLinear` / `AQConv2d` forwards (installed as `avq.kernels`).

- `dispatch`: picks a kernel per call (device, dtype, GEMM rows; `AVQ_KERNEL` override) and caches
  per-module derived data; the rule is in its docstring.
- `triton_vqgemm`: fused Triton VQ-GEMM decoding weight tiles from codes (CUDA; the Triton interpreter
  in tests). Imported lazily: CPU users never need triton.
- `lut`: CPU lookup-table GEMM for few rows, blocked dequantize (+ GEMM) for many.
- `conv`: convolution as implicit GEMM over unfolded input, or dequantize + `F.conv2d`.
"""
