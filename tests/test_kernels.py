"""Kernels (`avq.kernels`) against dequantize-then-matmul.

Without CUDA the Triton kernel runs under the Triton interpreter (`tests/conftest.py` sets
`TRITON_INTERPRET=1`), so shapes stay small. The interpreter's bf16 `tl.dot` is broken (triton 3.9), so
there the kernel rounds bf16 operands and multiplies in fp32; the native bf16 dot is tested on CUDA only.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import use_compiled_backend
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from avq import AQConv2d, AQLinear, QuantizedWeight, QuantSpec
from avq.core.qweight import code_dtype, decode
from avq.kernels import choice, compiled, conv, dispatch, lut, routes, triton_vqgemm, weights

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
HYPOTHESIS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# atol relative to the largest |output|: fp32 accumulates identically up to order; fp16/bf16 round the
# decoded weight (and x is already in that dtype in both paths).
# On CUDA, sweeps use one fixed config: autotuning every random shape would compile 5 configs each time.
# Autotuning itself runs in the module tests and the CUDA bf16 test.
SWEEP_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 1} if CUDA else None
ATOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2, torch.float64: 1e-6}


def random_qweight(shape: tuple[int, ...], spec: QuantSpec, seed: int = 0, device: str = "cpu"):
    gen = torch.Generator().manual_seed(seed)
    K = 1
    for d in shape[1:]:
        K *= d
    M, C, g = spec.num_codebooks, spec.codebook_size, spec.group_size
    codes = torch.randint(0, C, (shape[0], K // g, M), generator=gen).to(code_dtype(spec.nbits))
    codebooks = torch.randn(M, C, g, generator=gen).half()
    scales = (torch.rand(shape[0], generator=gen) + 0.5).half()
    return QuantizedWeight(spec, shape, codes, codebooks, scales).to(device)


def assert_close_scaled(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.shape == ref.shape and got.dtype == dtype
    scale = max(float(ref.abs().max()), 1.0)
    torch.testing.assert_close(got.double(), ref.double(), rtol=0, atol=ATOL[dtype] * scale)


def reference(
    x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None, triton: bool = False
) -> torch.Tensor:
    """fp32 dequantize-then-matmul of the given (already rounded) inputs, rounded as the kernel documents:
    the unscaled codeword sums are cast to the input dtype (the `tl.dot` operand), the scales multiply the
    fp32 accumulator. `triton`: rounded as the Triton kernel here (the interpreter's bf16 cast)."""
    ones = torch.ones_like(qw.scales)
    sums = decode(qw.codes, qw.codebooks, ones)  # [N, K] fp32
    if triton and x.dtype == torch.bfloat16 and triton_vqgemm.INTERPRET:
        # The interpreter casts fp32 to bf16 by truncation, not to nearest (measured: a K = 16 dot off by
        # 0.031 from round-to-nearest operands, 0.0025 from truncated ones), so round as it does.
        w = (sums.contiguous().view(torch.int32) & ~0xFFFF).view(torch.float32).to(x.device)
    else:
        w = sums.to(x.dtype).float().to(x.device)  # [N, K], as fed to tl.dot
    y = F.linear(x.float(), w) * qw.scales.float().to(x.device)
    return y if bias is None else y + bias.float()


@st.composite
def gemm_cases(draw, dtypes=(torch.float32, torch.float16, torch.bfloat16)):
    g = draw(st.sampled_from([4, 8, 16, 9]))
    nbits = draw(st.sampled_from([4, 8, 8, 16]))
    M = draw(st.integers(1, 2 if nbits == 16 else 4))  # B = 16: 65536-entry codebooks, keep them few
    spec = QuantSpec(M, nbits, g)
    N = draw(st.integers(1, 40))
    G = draw(st.integers(1, 6))
    R = draw(st.sampled_from([1, 3, 16, 17, 33]))  # small-M family, tile tails, several row tiles
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**16))
    return spec, N, G * g, R, dtype, draw(st.booleans()), seed


def make_case(spec, N, K, R, dtype, with_bias, seed):
    qw = random_qweight((N, K), spec, seed, DEVICE)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(R, K, generator=gen).to(DEVICE, dtype)
    bias = torch.randn(N, generator=gen).to(DEVICE) if with_bias else None
    return qw, x, bias


# ----------------------------------------------------------------------------- Triton VQ-GEMM
@HYPOTHESIS
@given(
    case=gemm_cases(),
    config=st.sampled_from(
        [
            None,  # the interpreter default (SWEEP_CONFIG on CUDA)
            {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "SPLIT_K": 1},  # many N and K tiles
            {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 3},  # split-K with atomics
        ]
    ),
)
def test_triton_vqgemm_matches_dequant(case, config) -> None:
    spec, N, K, R, dtype, with_bias, seed = case
    qw, x, bias = make_case(spec, N, K, R, dtype, with_bias, seed)
    y = triton_vqgemm.vq_matmul(x, qw.codes, qw.codebooks, qw.scales, bias, config=config or SWEEP_CONFIG)
    assert_close_scaled(y, reference(x, qw, bias, triton=True), dtype)


@pytest.mark.parametrize("g", [4, 8, 16, 9])
@pytest.mark.parametrize("nbits", [8, 16])
@pytest.mark.parametrize("M", [1, 2, 3, 4])
def test_triton_vqgemm_every_spec_family(M: int, nbits: int, g: int) -> None:
    """Every (M, B, g) the presets use, with row, K and N tails; the random sweep above may miss one."""
    qw, x, bias = make_case(QuantSpec(M, nbits, g), 19, 3 * g, 17, torch.float32, True, M * nbits + g)
    y = triton_vqgemm.vq_matmul(x, qw.codes, qw.codebooks, qw.scales, bias, config=SWEEP_CONFIG)
    assert_close_scaled(y, reference(x, qw, bias), torch.float32)


def test_suite_runs_triton_in_one_mode() -> None:
    """conftest.py must set TRITON_INTERPRET before triton is imported (else kernels are compiled)."""
    assert triton_vqgemm.INTERPRET != CUDA


def test_triton_vqgemm_strided_rows_and_errors() -> None:
    qw, x, bias = make_case(QuantSpec(2, 8, 8), 24, 32, 5, torch.float32, True, 0)
    wide = torch.randn(5, 48, device=DEVICE)
    wide[:, :32] = x
    y = triton_vqgemm.vq_matmul(wide[:, :32], qw.codes, qw.codebooks, qw.scales, bias)  # row stride 48
    assert_close_scaled(y, reference(x, qw, bias), torch.float32)
    with pytest.raises(TypeError, match="float64"):
        triton_vqgemm.vq_matmul(x.double(), qw.codes, qw.codebooks, qw.scales)
    with pytest.raises(ValueError, match="do not fit"):
        triton_vqgemm.vq_matmul(x[:, :16], qw.codes, qw.codebooks, qw.scales)
    empty = triton_vqgemm.vq_matmul(x[:0], qw.codes, qw.codebooks, qw.scales)
    assert empty.shape == (0, 24)


@pytest.mark.skipif(not CUDA, reason="native bf16 tl.dot: the Triton interpreter's bf16 dot is broken")
@pytest.mark.parametrize("R", [1, 7, 300])
def test_triton_vqgemm_cuda_bf16_native(R: int) -> None:
    qw, x, bias = make_case(QuantSpec(2, 8, 8), 96, 256, R, torch.bfloat16, True, 3)
    y = triton_vqgemm.vq_matmul(x, qw.codes, qw.codebooks, qw.scales, bias)
    assert_close_scaled(y, reference(x, qw, bias), torch.bfloat16)


# ----------------------------------------------------------------------------- CPU LUT path
@HYPOTHESIS
@given(
    case=gemm_cases(dtypes=(torch.float32, torch.float64, torch.float16, torch.bfloat16)),
    block_target=st.sampled_from([1, 2, 4, 16]),
)
def test_lut_matmul_matches_dequant(case, block_target: int) -> None:
    spec, N, K, R, dtype, with_bias, seed = case
    qw, x, bias = make_case(spec, N, K, R, dtype, with_bias, seed)
    x, bias, qw = x.cpu(), None if bias is None else bias.cpu(), qw.to("cpu")
    G, M = K // spec.group_size, spec.num_codebooks
    block = compiled.group_block(G, target=block_target)  # 1 .. G groups per LUT block
    index = lut.lut_index(qw.codes, spec.codebook_size, block)
    assert index.dtype == torch.int32 and index.shape == (G // block, N, block * M)
    books = qw.codebooks.double() if dtype == torch.float64 else qw.codebooks.float()
    y = lut.lut_matmul(x, index, books, qw.scales, bias)
    # Against the exact product (fp64, the weight decoded from the codebooks the LUT reads): the LUT computes
    # in fp32 (fp64 for fp64) and rounds once at the end. `reference` rounds the weight to `dtype` as the
    # Triton kernel feeds `tl.dot`, and computes in fp32: each alone exceeded these tolerances (fp16 at
    # K = 54; fp64, whose tolerance is below fp32's round-off).
    idx = qw.codes.long()  # [N, G, M]
    groups = sum(books.double()[m][idx[..., m]] for m in range(M))  # [N, G, g] fp64
    w = (groups * qw.scales.double()[:, None, None]).reshape(N, K)  # [N, K] fp64
    exact = F.linear(x.double(), w) + (0 if bias is None else bias.double())
    assert y.dtype == dtype and y.shape == exact.shape
    scale = max(1.0, float(exact.abs().max()))
    torch.testing.assert_close(y.double(), exact, rtol=0, atol=ATOL[dtype] * scale)


@pytest.mark.parametrize(
    "spec", [QuantSpec(1, 8, 4), QuantSpec(3, 8, 9), QuantSpec(4, 4, 16), QuantSpec(2, 16, 8)]
)
@pytest.mark.parametrize("path", ["native", "native-parallel", "numba", "numba-parallel", "torch"])
def test_fast_dequantize_is_bit_identical_to_decode(monkeypatch, spec: QuantSpec, path: str) -> None:
    """Each decode path (the compiled kernel of each backend on one thread or several, the embedding_bag
    fallback) gives exactly `decode`'s weights, into fresh memory, into a half workspace, and block by block
    in the GEMM."""
    monkeypatch.setattr(lut, "DEQUANT_BLOCK_BYTES", 64)  # several row blocks (16 rows each) + a tail
    if path == "torch":
        monkeypatch.setattr(compiled, "decode_into", lambda *a: False)
    else:
        use_compiled_backend(monkeypatch, path.split("-")[0])
    if path.endswith("-parallel"):
        monkeypatch.setattr(compiled, "DECODE_PARALLEL_MIN", 0)
        monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    qw = random_qweight((37, 4 * spec.group_size), spec, seed=5)
    ref = decode(qw.codes, qw.codebooks, qw.scales)
    assert torch.equal(lut.dequantize(qw.codes, qw.codebooks, qw.scales), ref)
    half = torch.empty(37, 4 * spec.group_size, dtype=torch.float16)
    assert torch.equal(lut.dequantize(qw.codes, qw.codebooks, qw.scales, out=half), ref.half())
    x, bias = torch.randn(5, 4 * spec.group_size), torch.randn(37)
    y = lut.dequant_matmul(x, qw.codes, qw.codebooks, qw.scales, bias)
    torch.testing.assert_close(y, F.linear(x, ref, bias), rtol=1e-6, atol=1e-5)


# ----------------------------------------------------------------------------- convolutions
CONV_GEOMETRIES = [
    # (weight shape, stride, padding, dilation)
    ((6, 3, 3, 3), (1, 1), (1, 1), (1, 1)),
    ((6, 3, 3, 3), (2, 1), (0, 2), (1, 2)),
    ((5, 4, 1, 1), (1, 1), (0, 0), (1, 1)),  # 1x1: channels-last view, no unfold
    ((5, 4, 1, 1), (2, 2), (0, 0), (1, 1)),
    ((4, 2, 2, 2), (1, 1), "same", (1, 1)),  # even kernel: asymmetric padding
    ((4, 2, 3, 3), (1, 1), "same", (2, 1)),
    ((4, 2, 3, 3), (1, 1), "valid", (1, 1)),
]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize(("shape", "stride", "padding", "dilation"), CONV_GEOMETRIES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_implicit_gemm_matches_conv2d(shape, stride, padding, dilation, channels_last: bool) -> None:
    w = torch.randn(shape)
    x = torch.randn(2, shape[1], 7, 6)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w2d = w.reshape(shape[0], -1)
    y = conv.implicit_gemm(x, lambda cols: cols @ w2d.T, shape[2:], stride, padding, dilation)
    ref = F.conv2d(x, w, None, stride, padding, dilation)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert conv.rows_of(x, shape[2:], stride, padding, dilation) == ref.shape[0] * ref.shape[2] * ref.shape[3]


# ----------------------------------------------------------------------------- modules + dispatch
LINEAR_SPECS = [QuantSpec(1, 8, 4), QuantSpec(2, 8, 8), QuantSpec(3, 4, 16), QuantSpec(1, 16, 8)]
CONV_SPECS = [QuantSpec(2, 8, 9, "kernel"), QuantSpec(1, 8, 4), QuantSpec(4, 4, 9)]
KERNEL_VALUES = ["triton", "lut", "dequant", "auto", ""]


@pytest.mark.parametrize("kernel", KERNEL_VALUES)
@pytest.mark.parametrize("spec", LINEAR_SPECS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_aqlinear_under_each_kernel_equals_dequant(monkeypatch, kernel, spec, dtype) -> None:
    monkeypatch.setenv("AVQ_KERNEL", kernel)
    qw = random_qweight((40, 48), spec, seed=1, device=DEVICE)
    bias = torch.randn(40, device=DEVICE)
    layer = AQLinear(qw, bias)
    x = torch.randn(2, 9, 48, device=DEVICE).to(dtype)
    ref = F.linear(x, qw.dequantize(dtype), bias.to(dtype))
    with torch.no_grad():
        y = layer(x)
    if kernel == "dequant" and dtype == torch.float32:  # same decoded weight, blocked GEMM
        torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-5)
    else:
        assert_close_scaled(y, F.linear(x.float(), qw.dequantize(), bias), dtype)
    assert y.shape == (2, 9, 40)


@pytest.mark.parametrize("kernel", KERNEL_VALUES)
@pytest.mark.parametrize("spec", CONV_SPECS)
@pytest.mark.parametrize(("stride", "padding"), [(1, 1), (2, "valid"), (1, "same")])
def test_aqconv2d_under_each_kernel_equals_dequant(monkeypatch, kernel, spec, stride, padding) -> None:
    monkeypatch.setenv("AVQ_KERNEL", kernel)
    qw = random_qweight((20, 4, 3, 3), spec, seed=2, device=DEVICE)
    bias = torch.randn(20, device=DEVICE)
    layer = AQConv2d(qw, bias, stride=stride, padding=padding)
    x = torch.randn(2, 4, 6, 5, device=DEVICE)
    ref = F.conv2d(x, qw.dequantize(), bias, stride, padding)
    with torch.no_grad():
        y = layer(x)
    if kernel == "dequant":
        assert torch.equal(y, ref)
    else:
        assert_close_scaled(y, ref, torch.float32)


@pytest.mark.parametrize("kernel", KERNEL_VALUES)
def test_backward_reaches_codebooks_and_scales_under_every_kernel(monkeypatch, kernel) -> None:
    monkeypatch.setenv("AVQ_KERNEL", kernel)
    bias = torch.zeros(40, device=DEVICE)
    lin = AQLinear(random_qweight((40, 32), QuantSpec(2, 8, 8), device=DEVICE), bias)
    cv = AQConv2d(random_qweight((8, 4, 3, 3), QuantSpec(1, 8, 9, "kernel"), device=DEVICE), padding=1)
    x = torch.randn(3, 32, device=DEVICE)
    (lin(x).square().sum() + cv(torch.randn(1, 4, 5, 5, device=DEVICE)).square().sum()).backward()
    for module in (lin, cv):
        for name in ("codebooks", "scales"):
            grad = getattr(module, name).grad
            assert grad is not None and grad.abs().sum() > 0, name


def test_gradient_to_input_through_frozen_layer(monkeypatch) -> None:
    """A frozen quantized layer inside a trained model: backward must still reach x."""
    monkeypatch.setenv("AVQ_KERNEL", "lut")
    layer = AQLinear(random_qweight((40, 32), QuantSpec(2, 8, 8))).requires_grad_(False)
    x = torch.randn(3, 32, requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, layer.qweight.dequantize().sum(0).expand(3, -1).float())


@pytest.mark.parametrize("value", ["cuda", "Triton2", "none", "0"])
def test_invalid_avq_kernel_is_a_clear_error(monkeypatch, value: str) -> None:
    monkeypatch.setenv("AVQ_KERNEL", value)
    layer = AQLinear(random_qweight((6, 16), QuantSpec(1, 8, 4)))
    message = rf"AVQ_KERNEL='{value}' is not a kernel; use one of triton, lut, dequant, fused"
    with pytest.raises(ValueError, match=message):
        layer(torch.randn(2, 16))
    monkeypatch.setenv("AVQ_KERNEL", " LUT ")  # case and spaces are forgiven
    assert choice.kernel_override() == "lut"


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setenv("AVQ_KERNEL", "triton")
    monkeypatch.setattr(triton_vqgemm, "INTERPRET", False)
    layer = AQLinear(random_qweight((6, 16), QuantSpec(1, 8, 4)))
    with torch.no_grad(), pytest.raises(RuntimeError, match="needs a CUDA tensor"):
        layer(torch.randn(2, 16))


def test_automatic_rule() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    s28, s116 = QuantSpec(2, 8, 8), QuantSpec(1, 16, 8)
    choose = choice.choose_linear_kernel
    assert choose(cpu, torch.float32, 1, s28, 320) == "lut"  # one row: the LUT always wins
    assert choose(cpu, torch.bfloat16, 4, s28, 4096) == "lut"  # 4 * 2 * 256 <= 4096
    assert choose(cpu, torch.float32, 4, s28, 1280) == "dequant"  # LUT build > decode
    assert choose(cpu, torch.float32, choice.LUT_MAX_ROWS + 1, s28, 4096) == "dequant"
    assert choose(cpu, torch.float32, 1, s116, 4096) == "dequant"  # B = 16: the LUT never pays on CPU
    assert choose(cuda, torch.float16, 1, s116, 4096) == "triton"
    assert choose(cuda, torch.bfloat16, choice.TRITON_MAX_ROWS + 1, s28, 4096) == "dequant"
    assert choose(cuda, torch.float64, 1, s28, 4096) == "dequant"
    assert conv.choose_conv_strategy(cpu, 1, 320) == "dequant"
    assert conv.choose_conv_strategy(cuda, 64, 320) == "implicit"
    assert conv.choose_conv_strategy(cuda, 64, 8) == "dequant"  # patches 8x the weight
    assert conv.choose_conv_strategy(cuda, conv.GPU_IMPLICIT_MAX_ROWS + 1, 4096) == "dequant"


@pytest.mark.parametrize("spec_text", ["1x8g4", "2x8g8", "2x4g2", "3x6g4", "1x12g8"])
@pytest.mark.parametrize(
    "R, dtype", [(1, torch.float32), (3, torch.float32), (2, torch.float16), (1, torch.bfloat16)]
)
@pytest.mark.parametrize("threads", ["serial", "parallel"])
def test_compiled_lut_matches_dequant(
    monkeypatch, compiled_backend: str, spec_text: str, R: int, dtype: torch.dtype, threads
) -> None:
    if threads == "parallel":  # these small layers run serially by default (LUT_PARALLEL_MIN)
        monkeypatch.setattr(compiled, "LUT_PARALLEL_MIN", 0)
        monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    spec = QuantSpec.parse(spec_text)
    N, K = 40, spec.group_size * 24  # 24 groups: blocks of 8, and N not a multiple of the thread split
    qw, x, bias = make_case(spec, N, K, R, dtype, True, seed=R)
    x, bias, qw = x.cpu(), bias.cpu(), qw.to("cpu")
    blocked = compiled.blocked_codes(qw.codes)
    assert blocked.dtype == qw.codes.dtype and blocked.shape == (3, N, 8 * spec.num_codebooks)
    y = compiled.lut_matmul_codes(x, blocked, qw.codebooks.float(), qw.scales, bias)
    ref = reference(x, qw, bias)
    assert y.dtype == dtype
    if dtype in (torch.float16, torch.bfloat16):
        torch.testing.assert_close(y, ref.to(dtype), rtol=0, atol=ATOL[dtype] * max(1.0, ref.abs().max()))
    else:
        assert_close_scaled(y, ref, dtype)


def test_fixed_cpu_rule_uses_lut_for_wide_layers() -> None:
    """The fixed rule (reported by `choose_linear_kernel`; automatic CPU calls measure instead:
    tests/test_autotune.py)."""
    spec, cpu = QuantSpec(1, 8, 4), torch.device("cpu")
    assert choice.choose_linear_kernel(cpu, torch.float32, 1, spec, 1024) == "lut"
    assert choice.choose_linear_kernel(cpu, torch.float32, choice.LUT_MAX_ROWS + 1, spec, 1024) == "dequant"
    assert choice.choose_linear_kernel(cpu, torch.float32, 2, spec, 64) == "dequant"  # LUT build too big


def test_cache_follows_code_and_codebook_edits(monkeypatch) -> None:
    """PV-Tuning edits codes in place; a replaced buffer or an edited codebook must be seen too."""
    monkeypatch.setenv("AVQ_KERNEL", "lut")
    layer = AQLinear(random_qweight((8, 16), QuantSpec(1, 8, 4)))
    x = torch.randn(2, 16)

    def check() -> None:
        with torch.no_grad():
            ref = F.linear(x, layer.qweight.dequantize())
            torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)

    check()
    layer.codes[0, 0, 0] = (int(layer.codes[0, 0, 0]) + 1) % 256  # in place: _version bumps
    check()
    layer.codes = torch.randint(0, 256, layer.codes.shape, dtype=torch.uint8)  # replaced buffer
    check()
    with torch.no_grad():
        layer.codebooks.mul_(-1)  # an optimizer step on the codebooks
    check()
    monkeypatch.setenv("AVQ_KERNEL", "dequant")
    check()
    layer.codes.data[0, 0, 0] ^= 1  # bypasses the version counter: documented, needs invalidate()
    dispatch.invalidate(layer)
    check()


@torch.no_grad()
def test_prepared_forwards_are_reused_until_the_call_or_the_module_changes(monkeypatch) -> None:
    """A module's forward is prepared once and served while nothing it depends on changes; each change
    (input shape, kernel setting, an edited or replaced tensor, `invalidate`) prepares it again."""
    monkeypatch.setenv("AVQ_KERNEL", "dequant")
    layer = AQConv2d(random_qweight((8, 4, 3, 3), QuantSpec(2, 8, 4), seed=5), bias=torch.randn(8), padding=1)
    built: list[str] = []
    real = dispatch._conv_runner
    monkeypatch.setattr(dispatch, "_conv_runner", lambda k, *a: built.append(k) or real(k, *a))

    def check(x: torch.Tensor) -> None:
        ref = F.conv2d(x, layer.qweight.dequantize(), layer.bias, 1, 1)
        torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)

    x = torch.randn(1, 4, 6, 6)
    check(x)
    check(x)
    assert built == ["dequant"] and routes.kernel_of(layer) == "dequant"
    check(torch.randn(2, 4, 6, 6))  # another input shape
    layer.codes[0, 0, 0] ^= 1  # in place: the version counter moves
    check(torch.randn(2, 4, 6, 6))
    layer.bias.add_(1.0)
    check(torch.randn(2, 4, 6, 6))
    layer.codes = layer.codes.clone()  # a replaced buffer
    check(torch.randn(2, 4, 6, 6))
    layer.codebooks.data = -layer.codebooks.data  # new data, same version counter (as `.to()` swaps it)
    check(torch.randn(2, 4, 6, 6))
    assert len(built) == 6
    monkeypatch.setenv("AVQ_KERNEL", "lut")
    check(torch.randn(2, 4, 6, 6))
    assert built[-1] == "lut" and routes.kernel_of(layer) == "lut"
    layer.codes.data[0, 0, 0] ^= 1  # bypasses the version counter: documented, needs invalidate()
    dispatch.invalidate(layer)
    check(torch.randn(2, 4, 6, 6))
    assert len(built) == 8

    # a route holds the module's tensors, never the module: it dies with the module
    import gc
    import weakref

    for _ in range(3):  # invalidate / prepare cycles (as fine-tuning loops do) watch the module once
        dispatch.invalidate(layer)
        check(x)
    assert len([f for f in weakref.finalize._registry.values() if f.args == (id(layer),)]) == 1

    dead, ident = weakref.ref(layer), id(layer)
    layer = None  # the only reference (check() closes over this name)
    gc.collect()
    assert dead() is None
    assert ident not in routes._ROUTES  # its entry left with it


@torch.no_grad()
def test_a_route_is_never_served_to_another_module() -> None:
    """Routes are looked up by the module's id, which Python reuses after the module dies: a route must
    only run for the module it was prepared for."""
    first = AQLinear(random_qweight((8, 16), QuantSpec(1, 8, 4), seed=1))
    x = torch.randn(2, 16)
    first(x)
    route = routes._ROUTES[id(first)]
    second = AQLinear(random_qweight((8, 16), QuantSpec(1, 8, 4), seed=2))
    routes._ROUTES[id(second)] = route  # as if `second` had been allocated at `first`'s address
    assert routes.lookup(second, routes.call_key(x)) is None
    assert routes.kernel_of(second) is None
    torch.testing.assert_close(second(x), F.linear(x, second.qweight.dequantize()), rtol=1e-5, atol=1e-5)


def test_importing_avq_loads_neither_numba_nor_faiss() -> None:
    """numba (~55 MiB resident) and faiss load on first use: loading or running a quantized model on a GPU
    never needs them, quantizing needs only faiss, a CPU forward the compiled kernels, and numba's LLVM
    (~120 MiB once a kernel has run) only where the native kernels do not build."""
    code = (
        "import sys, torch, avq, avq.core.modules, avq.kernels.dispatch\n"
        "loaded = [m for m in ('numba', 'faiss') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
        "from avq import AQLinear, QuantizedWeight, QuantSpec\n"
        "from avq.kernels import compiled\n"
        "spec = QuantSpec.parse('2x8g8')\n"
        "codes = torch.randint(0, 256, (64, 8, 2), dtype=torch.uint8)\n"
        "qw = QuantizedWeight(spec, (64, 64), codes, torch.randn(2, 256, 8).half(), torch.ones(64).half())\n"
        "with torch.no_grad():\n"
        "    AQLinear(qw)(torch.randn(3, 64))\n"
        "print(compiled.backend(), 'numba' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    backend, numba_loaded = done.stdout.split()
    assert numba_loaded == str(backend == "numba"), done.stdout


def test_dequant_workspace_is_reused_and_correct(monkeypatch) -> None:
    monkeypatch.setenv("AVQ_KERNEL", "dequant")
    big = AQLinear(random_qweight((32, 64), QuantSpec(1, 8, 4), seed=1))
    small = AQLinear(random_qweight((16, 32), QuantSpec(2, 8, 8), seed=2))
    key = (torch.device("cpu"), torch.float16)
    weights.WORKSPACE.pool = {}
    with torch.no_grad():
        for layer in (small, big, small, big):  # the buffer grows once, at `big`
            w = weights.dense_weight(layer, torch.float16)
            assert torch.equal(w, layer.qweight.dequantize(torch.float16).flatten(1))
            buffer, views = weights.WORKSPACE.pool[key]
            assert w.data_ptr() == buffer.data_ptr()  # in the current buffer, never a replaced one
    assert buffer.numel() == 32 * 64 and set(views) == {(32, 64), (16, 32)}
    assert weights.dense_weight(small, torch.float16) is views[(16, 32)]  # the view is kept
    conv_layer = AQConv2d(random_qweight((8, 4, 3, 3), QuantSpec(1, 8, 9)), padding=1)
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        assert torch.equal(conv_layer(x), F.conv2d(x, conv_layer.qweight.dequantize(), None, 1, 1))
