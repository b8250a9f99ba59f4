"""Uniform baselines (RTN, GPTQ): storage contract, error ordering, fp16 round trip, bad inputs."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import avq
from avq.core.baselines import UniformQuantizedWeight, quantize_weight_gptq, quantize_weight_rtn
from avq.core.bits import total_bits


def correlated_layer(out: int = 48, K: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and a correlated Hessian: X = Z diag(1/sqrt(i)) U^T, with uneven input magnitudes."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, K, generator=g)
    U, _ = torch.linalg.qr(torch.randn(K, K, generator=g))
    spectrum = 1 / torch.arange(1, K + 1).float().sqrt()
    X = (torch.randn(4 * K, K, generator=g) * spectrum) @ U.T  # [n, K]
    X = X * torch.linspace(0.2, 2.0, K)[torch.randperm(K, generator=g)]  # channels of uneven energy
    return W, X.T @ X / X.shape[0]


# ------------------------------------------------------------------ groups
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_groups_store_a_grid_per_group_and_count_its_bits(method: str) -> None:
    """With `group_size` each group of a row has its own fp16 scale and zero (a short last group too):
    every weight is within half a step of its group's grid (RTN), and the bits count 32 per group."""
    W, H = correlated_layer(out=12, K=100)
    for g in (32, 64):
        q = quantize_weight_rtn(W, 3, H, group_size=g) if method == "rtn" else (
            quantize_weight_gptq(W, H, 3, group_size=g))  # fmt: skip
        G = math.ceil(100 / g)
        assert q.group_size == g and q.scales.shape == q.zeros.shape == (12, G)
        assert q.scales.dtype == torch.float16 and q.info["group_size"] == g
        assert q.storage_bits == 12 * 100 * 3 + 2 * 12 * G * 16
        assert q.total_bits == pytest.approx(3 + 32 * G / 100)
        assert total_bits(W.shape, 3, g) == pytest.approx(q.total_bits)
        if method == "rtn":  # the grid of group j spans group j's weights: within half a step of each
            step = q.scales.float().repeat_interleave(g, dim=1)[:, :100]  # [out, K]
            assert ((q.dequantize() - W).abs() <= step / 2 + 1e-6).all()
        again = UniformQuantizedWeight(
            bits=3, shape=q.shape, codes=q.codes, scales=q.scales, zeros=q.zeros, group_size=g
        )
        assert torch.equal(again.dequantize(), q.dequantize())


@pytest.mark.parametrize("bits", [2, 3])
def test_groups_beat_one_grid_per_row(bits: int) -> None:
    """Smaller groups, smaller error, for RTN and GPTQ alike; GPTQ still beats RTN with groups."""
    W, H = correlated_layer(out=32, K=256, seed=3)
    W = W * torch.linspace(0.1, 3.0, 256)  # inputs of uneven weight ranges: what groups are for
    for solve in (
        lambda g: quantize_weight_rtn(W, bits, H, group_size=g),
        lambda g: quantize_weight_gptq(W, H, bits, group_size=g),
    ):
        errors = [solve(g).info["relative_error"] for g in (None, 128, 32)]
        assert errors[0] > errors[1] > errors[2], errors
    rtn, gptq = (f(W, H) for f in (
        lambda W, H: quantize_weight_rtn(W, bits, H, group_size=64),
        lambda W, H: quantize_weight_gptq(W, H, bits, group_size=64),
    ))  # fmt: skip
    assert gptq.info["relative_error"] < rtn.info["relative_error"]


def test_bad_group_sizes() -> None:
    W, H = correlated_layer(out=4, K=16)
    for bad in (0, -8, 2.5, True):
        with pytest.raises(ValueError, match="group_size must be None or an int >= 1"):
            quantize_weight_rtn(W, 4, group_size=bad)
        with pytest.raises(ValueError, match="group_size must be None or an int >= 1"):
            quantize_weight_gptq(W, H, 4, group_size=bad)
    q = quantize_weight_rtn(W, 4, group_size=8)
    with pytest.raises(ValueError, match=r"scales has shape \[4, 2\], expected \[4\]"):
        UniformQuantizedWeight(bits=4, shape=q.shape, codes=q.codes, scales=q.scales, zeros=q.zeros)


# ------------------------------------------------------------------ storage contract
@pytest.mark.parametrize("shape", [(16, 24), (8, 4, 3, 3), (8, 6, 1, 1)])
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_dequantize_shape_dtype_and_codes(shape: tuple[int, ...], method: str) -> None:
    torch.manual_seed(0)
    weight = torch.randn(shape)
    K = math.prod(shape[1:])
    for bits in (2, 3, 8):
        if method == "rtn":
            q = quantize_weight_rtn(weight, bits)
        else:
            q = quantize_weight_gptq(weight, torch.eye(K) + 0.1, bits)
        assert q.shape == shape
        assert q.dequantize().shape == shape and q.dequantize().dtype == torch.float32
        assert q.dequantize(torch.float16).dtype == torch.float16
        assert q.codes.shape == (shape[0], K) and q.codes.dtype == torch.uint8
        assert int(q.codes.max()) <= (1 << bits) - 1
        assert q.scales.shape == q.zeros.shape == (shape[0],)
        assert q.scales.dtype == q.zeros.dtype == torch.float16
        assert q.code_bits == bits
        assert q.num_weights == weight.numel()
        assert q.total_bits == pytest.approx(bits + 32 / K)
        assert q.storage_bits == weight.numel() * bits + 32 * shape[0]


def test_all_levels_used_at_minmax() -> None:
    """The min-max grid spans each row: with a row's extremes present, both end levels appear."""
    torch.manual_seed(1)
    q = quantize_weight_rtn(torch.randn(4, 64), 3)
    assert (q.codes.min(1).values == 0).all() and (q.codes.max(1).values == 7).all()


def test_conv_layout_matches_unfold() -> None:
    """The H-weighted error of a conv equals its output error on the calibration inputs (F.unfold order)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    x = torch.randn(16, 3, 8, 8)
    acc = avq.HessianAccumulator(conv)
    acc.add(x)
    q = quantize_weight_gptq(conv.weight.data, acc.hessian, 2)
    dy = F.conv2d(x, conv.weight.data - q.dequantize(), padding=1)
    y = F.conv2d(x, conv.weight.data, padding=1)
    assert q.info["relative_error"] == pytest.approx(float(dy.pow(2).sum() / y.pow(2).sum()), rel=1e-4)


# ------------------------------------------------------------------ fp16 round trip
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_error_is_that_of_the_stored_tensors(method: str) -> None:
    W, H = correlated_layer()
    W = W * 1e-2  # small weights: fp16 rounding of the scales matters more
    q = quantize_weight_rtn(W, 3, H) if method == "rtn" else quantize_weight_gptq(W, H, 3)
    by_hand = q.scales.float()[:, None] * (q.codes.float() - q.zeros.float()[:, None])
    assert torch.equal(q.dequantize(), by_hand)
    assert q.info["relative_error"] == avq.relative_error(W, by_hand, H)
    assert q.info["error_metric"] == "hessian"
    assert q.info["seconds"] >= 0


@pytest.mark.parametrize("bits", [4, 8])
def test_rtn_rounds_to_the_nearest_stored_level(bits: int) -> None:
    """Codes are chosen on the fp16 grid as stored, not on the fp32 grid they were derived from."""
    W, _ = correlated_layer(out=64, K=256)
    W = W * 3e-3
    q = quantize_weight_rtn(W, bits)
    levels = torch.arange(1 << bits).float()
    grid = q.scales.float()[:, None] * (levels - q.zeros.float()[:, None])  # [out, 2^bits]
    nearest = (W[:, :, None] - grid[:, None, :]).abs().min(-1).values  # [out, K]
    assert torch.allclose((W - q.dequantize()).abs(), nearest, atol=1e-9, rtol=1e-6)


def test_rtn_without_hessian_reports_frobenius_error() -> None:
    W, _ = correlated_layer(out=8, K=32)
    q = quantize_weight_rtn(W, 4)
    assert q.info["error_metric"] == "frobenius"
    expected = float((W.double() - q.dequantize().double()).pow(2).sum() / W.double().pow(2).sum())
    assert q.info["relative_error"] == pytest.approx(expected, rel=1e-9)


def test_zero_rows_and_zero_weight_are_exact() -> None:
    W = torch.randn(4, 16)
    W[1] = 0
    assert torch.equal(quantize_weight_rtn(W, 2).dequantize()[1], torch.zeros(16))
    q = quantize_weight_gptq(torch.zeros(4, 16), torch.eye(16), 2)
    assert torch.equal(q.dequantize(), torch.zeros(4, 16)) and q.info["relative_error"] == 0.0


# ------------------------------------------------------------------ error ordering
def test_rtn_error_decreases_with_bits() -> None:
    W, H = correlated_layer()
    errors = [quantize_weight_rtn(W, b, H).info["relative_error"] for b in range(2, 9)]
    assert all(errors[i] > errors[i + 1] for i in range(len(errors) - 1)), errors
    assert errors[-1] < 1e-4


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_beats_rtn_on_correlated_hessian(bits: int) -> None:
    W, H = correlated_layer()
    rtn = quantize_weight_rtn(W, bits, H).info["relative_error"]
    plain = quantize_weight_gptq(W, H, bits, act_order=False, clip_search=False).info["relative_error"]
    assert plain < 0.7 * rtn, (plain, rtn)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("bits", [2, 4])
def test_act_order_and_clip_search_do_not_hurt(bits: int, seed: int) -> None:
    W, H = correlated_layer(seed=seed)

    def err(act_order: bool, clip_search: bool) -> float:
        q = quantize_weight_gptq(W, H, bits, act_order=act_order, clip_search=clip_search, block_size=32)
        return q.info["relative_error"]

    plain, ordered, clipped, both = err(False, False), err(True, False), err(False, True), err(True, True)
    assert ordered <= plain * 1.02, (ordered, plain)
    assert clipped < plain, (clipped, plain)  # a 1.0 shrink is in the grid: never worse, here better
    assert both < ordered, (both, ordered)


def test_gptq_with_diagonal_hessian_is_rtn() -> None:
    """No correlations, nothing to compensate: GPTQ must give RTN's codes, also through act-order's
    permutation and its inverse (the diagonal is deliberately unsorted)."""
    W, _ = correlated_layer(out=16, K=48)
    H = torch.diag(torch.rand(48, generator=torch.Generator().manual_seed(3)) + 0.1)
    rtn = quantize_weight_rtn(W, 3, H)
    gptq = quantize_weight_gptq(W, H, 3, act_order=True, clip_search=False, block_size=16)
    assert torch.equal(gptq.codes, rtn.codes)


def test_block_size_does_not_change_the_result() -> None:
    W, H = correlated_layer(out=16, K=48)
    a = quantize_weight_gptq(W, H, 3, block_size=48).dequantize()
    b = quantize_weight_gptq(W, H, 3, block_size=7).dequantize()
    assert (a != b).float().mean() < 0.01  # only float round-off may flip a level


def test_dead_inputs_are_handled_without_damping(caplog: pytest.LogCaptureFixture) -> None:
    W, H = correlated_layer(out=16, K=48)
    dead = torch.tensor([0, 5, 47])
    H[dead, :] = 0
    H[:, dead] = 0
    W[:, dead] = 100.0  # unseen weights must not widen the grid
    with caplog.at_level(logging.WARNING, logger="avq"):
        q = quantize_weight_gptq(W, H, 3)
    assert "damped" not in caplog.text
    rtn = quantize_weight_rtn(W, 3, H).info["relative_error"]
    assert math.isfinite(q.info["relative_error"]) and q.info["relative_error"] < 0.1 * rtn


def test_singular_hessian_is_damped_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    X = torch.randn(8, 32)  # rank 8 < K, no dead inputs
    with caplog.at_level(logging.WARNING, logger="avq"):
        q = quantize_weight_gptq(torch.randn(8, 32), X.T @ X / 8, 2)
    assert "damped" in caplog.text
    assert math.isfinite(q.info["relative_error"])


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("bits", [1, 9, 0, -2])
def test_bits_out_of_range(bits: int) -> None:
    with pytest.raises(ValueError, match="bits must be in 2..8"):
        quantize_weight_rtn(torch.randn(4, 8), bits)
    with pytest.raises(ValueError, match="bits must be in 2..8"):
        quantize_weight_gptq(torch.randn(4, 8), torch.eye(8), bits)


@pytest.mark.parametrize("bits", [2.5, "4", True, None])
def test_bits_not_an_int(bits: object) -> None:
    with pytest.raises(TypeError, match="bits must be an int"):
        quantize_weight_rtn(torch.randn(4, 8), bits)  # type: ignore[arg-type]


@pytest.mark.parametrize("shape", [(8,), (2, 3, 4), (1, 2, 3, 4, 5)])
def test_weight_must_be_2d_or_4d(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"Linear \[out, in\] or Conv2d"):
        quantize_weight_rtn(torch.randn(shape), 4)
    with pytest.raises(ValueError, match=r"Linear \[out, in\] or Conv2d"):
        quantize_weight_gptq(torch.randn(shape), torch.eye(shape[-1]), 4)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_weight_with_nan_or_inf(bad: float) -> None:
    W = torch.randn(4, 8)
    W[2, 3] = bad
    with pytest.raises(ValueError, match="mylayer: weight contains NaN or inf"):
        quantize_weight_rtn(W, 4, name="mylayer")
    with pytest.raises(ValueError, match="mylayer: weight contains NaN or inf"):
        quantize_weight_gptq(W, torch.eye(8), 4, name="mylayer")


def test_other_bad_weights() -> None:
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        quantize_weight_rtn([[1.0, 2.0]], 4)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="floating-point"):
        quantize_weight_rtn(torch.ones(4, 8, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="empty"):
        quantize_weight_rtn(torch.ones(0, 8), 4)
    with pytest.raises(ValueError, match="too large for fp16"):
        quantize_weight_rtn(torch.tensor([[-1e6, 1e6]]), 2)


def test_bad_hessians() -> None:
    W = torch.randn(4, 8)
    for fn in (lambda h: quantize_weight_rtn(W, 4, h), lambda h: quantize_weight_gptq(W, h, 4)):
        with pytest.raises(ValueError, match=r"hessian must be \[K, K\] = \[8, 8\]"):
            fn(torch.eye(6))
        with pytest.raises(ValueError, match="hessian contains NaN or inf"):
            fn(torch.full((8, 8), math.nan))
        with pytest.raises(TypeError, match="hessian must be a torch.Tensor"):
            fn(torch.eye(8).numpy())
    conv = torch.randn(4, 2, 3, 3)
    with pytest.raises(ValueError, match=r"\[18, 18\]"):
        quantize_weight_gptq(conv, torch.eye(9), 4)
    with pytest.raises(ValueError, match="no positive diagonal mass"):
        quantize_weight_gptq(W, torch.zeros(8, 8), 4)


def test_bad_solver_options() -> None:
    W = torch.randn(4, 8)
    with pytest.raises(ValueError, match="block_size"):
        quantize_weight_gptq(W, torch.eye(8), 4, block_size=0)
    with pytest.raises(ValueError, match="damp"):
        quantize_weight_gptq(W, torch.eye(8), 4, damp=-0.1)


def test_uniform_quantized_weight_validation() -> None:
    good = dict(
        bits=2,
        shape=(2, 3),
        codes=torch.zeros(2, 3, dtype=torch.uint8),
        scales=torch.ones(2, dtype=torch.float16),
        zeros=torch.zeros(2, dtype=torch.float16),
    )
    UniformQuantizedWeight(**good)
    with pytest.raises(ValueError, match="out of range for 2-bit codes"):
        UniformQuantizedWeight(**{**good, "codes": torch.full((2, 3), 4, dtype=torch.uint8)})
    with pytest.raises(ValueError, match=r"codes has shape \[3, 2\], expected \[2, 3\]"):
        UniformQuantizedWeight(**{**good, "codes": torch.zeros(3, 2, dtype=torch.uint8)})
    with pytest.raises(ValueError, match="scales has dtype torch.float32"):
        UniformQuantizedWeight(**{**good, "scales": torch.ones(2)})
    with pytest.raises(ValueError, match="zeros contains NaN"):
        UniformQuantizedWeight(**{**good, "zeros": torch.full((2,), math.nan, dtype=torch.float16)})
    with pytest.raises(ValueError, match="bits must be in 2..8"):
        UniformQuantizedWeight(**{**good, "bits": 9})


def test_exported_from_package() -> None:
    assert avq.UniformQuantizedWeight is UniformQuantizedWeight
    assert avq.quantize_weight_rtn is quantize_weight_rtn
    assert avq.quantize_weight_gptq is quantize_weight_gptq
    for name in ("UniformQuantizedWeight", "quantize_weight_rtn", "quantize_weight_gptq"):
        assert name in avq.__all__
