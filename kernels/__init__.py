"""Inference kernels behind `AQLinear` / `AQConv2d` forwards (installed as `avq.kernels`).

- `dispatch`: the forwards of `AQLinear` / `AQConv2d`: each call's kernel, prepared once (`routes`).
- `choice`: which kernel serves a call (`AVQ_KERNEL` override, fixed rules, the choice measured per host by
  `autotune`); the rule is in its docstring.
- `weights`: a module's weight as the kernels take it (derived copies, the decode into a shared workspace).
- `fused`: the native CPU decode-GEMM (`native.c`); `compiled`: the compiled gather-sum and decode.
- `triton_vqgemm`: fused Triton VQ-GEMM decoding weight tiles from codes (CUDA; the Triton interpreter
  in tests). Imported lazily: CPU users never need triton.
- `lut`: CPU lookup-table GEMM for few rows, blocked dequantize (+ GEMM) for many.
- `conv`: convolution as implicit GEMM over unfolded input, or dequantize + `F.conv2d`.
"""
