"""Quantization core: what one layer stores and how it is found.

- `spec`: `QuantSpec` (M codebooks of 2^B codewords of g weights); `layout`: a weight as `[out, K]` groups;
- `bits`: the one bit accounting (`storage_bits`, `total_bits`, `FP16_BITS`);
- `qweight`: `QuantizedWeight` (codes, codebooks, scales; `dequantize`, bits);
- `hessian`: `prepare_hessian` (checks and damping of a layer's `H`);
- `aq`: the AQ layer solver (`quantize_weight`, `SolverOptions`);
- `beam`: the code search it shares with fine-tuning's V step (`beam_search`, `candidate_rhs`);
- `baselines`: RTN and GPTQ (`UniformQuantizedWeight`);
- `modules`: `AQLinear` / `AQConv2d`, whose forward dispatches to `avq.kernels`.
"""
