"""Streamed Hessians match the explicit E[x x^T] over unfolded inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import avq


def test_linear_hessian_is_mean_outer_product_over_tokens():
    layer = nn.Linear(6, 3)
    acc = avq.HessianAccumulator(layer)
    handle = layer.register_forward_hook(acc.hook)
    xs = [torch.randn(2, 5, 6), torch.randn(4, 6)]
    for x in xs:
        layer(x)
    handle.remove()
    rows = torch.cat([x.reshape(-1, 6) for x in xs])
    assert torch.allclose(acc.hessian, rows.T @ rows / rows.shape[0], atol=1e-6)
    assert acc.count == 14


@pytest.mark.parametrize("padding, stride, dilation", [(1, 1, 1), (0, 2, 1), ("same", 1, 2), ("valid", 1, 1)])
def test_conv_hessian_reproduces_the_layer_objective(padding, stride, dilation):
    # For any weight change dW, tr(dW H dW^T) * count must equal the summed squared output change.
    conv = nn.Conv2d(3, 4, 3, padding=padding, stride=stride, dilation=dilation, bias=False)
    acc = avq.HessianAccumulator(conv)
    x = torch.randn(2, 3, 9, 9)
    acc.add(x)
    dW = torch.randn_like(conv.weight)
    out_change = F.conv2d(x, dW, padding=padding, stride=stride, dilation=dilation)
    lhs = ((dW.reshape(4, -1) @ acc.hessian) * dW.reshape(4, -1)).sum() * acc.count
    assert lhs == pytest.approx(out_change.pow(2).sum().item(), rel=1e-4)


def test_unsupported_layers_are_named():
    with pytest.raises(ValueError, match="grouped convolutions"):
        avq.HessianAccumulator(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        avq.HessianAccumulator(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="even kernel"):
        avq.HessianAccumulator(nn.Conv2d(4, 4, 2, padding="same"))
    with pytest.raises(TypeError, match="supports nn.Linear and nn.Conv2d"):
        avq.HessianAccumulator(nn.Embedding(4, 4))
    with pytest.raises(RuntimeError, match="no inputs were recorded"):
        _ = avq.HessianAccumulator(nn.Linear(2, 2)).hessian


def test_float32_sum_matches_float64_and_is_taken_in_place():
    # Many batches of large-magnitude, offset inputs: the float32 sum stays within float32 round-off of the
    # float64 reference, and `take` hands over the sum's own buffer.
    conv = nn.Conv2d(8, 4, 3, padding=1)
    acc32, acc64 = avq.HessianAccumulator(conv), avq.HessianAccumulator(conv, dtype=torch.float64)
    assert acc32.sum.dtype == torch.float32
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        x = 30 + 10 * torch.randn(4, 8, 6, 6, generator=generator)
        acc32.add(x)
        acc64.add(x)
    reference = acc64.sum / acc64.count
    buffer = acc32.sum.data_ptr()
    H = acc32.take()
    assert H.data_ptr() == buffer and H.dtype == torch.float32
    assert (H.double() - reference).norm() / reference.norm() < 1e-5
    with pytest.raises(RuntimeError, match="already taken"):
        acc32.take()
    with pytest.raises(ValueError, match="float32 or float64"):
        avq.HessianAccumulator(conv, dtype=torch.float16)


def test_solver_can_work_in_the_given_hessian():
    # overwrite_hessian=True: the same result without a copy of H; the caller's H is spent.
    W = torch.randn(16, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    X = torch.randn(200, 36, generator=torch.Generator().manual_seed(2))
    H = X.T @ X / 200
    spent = H.clone()
    copied = avq.quantize_weight(W, H, avq.QuantSpec(1, 4, 2), max_rounds=2)
    inplace = avq.quantize_weight(W, spent, avq.QuantSpec(1, 4, 2), max_rounds=2, overwrite_hessian=True)
    assert torch.equal(copied.codes, inplace.codes) and torch.equal(copied.codebooks, inplace.codebooks)
    assert inplace.info["relative_error"] == pytest.approx(copied.info["relative_error"], rel=1e-6)
    assert not torch.equal(spent, H)  # worked in place (scaled to mean diagonal 1)


def test_default_pass_budget_sets_the_solver_aside():
    from avq.calibration.statistics import default_hessian_gib, pass_budget_gib

    gib = 2**30
    assert pass_budget_gib(20 * gib, 0) == pytest.approx(5.0)
    # K = 23,040: two float32 [K, K] buffers (3.95 GiB) are set aside before the quarter is taken.
    assert pass_budget_gib(20 * gib, 23040) == pytest.approx((20 - 2 * 4 * 23040**2 / gib) / 4)
    assert pass_budget_gib(gib, 23040) == 0.0  # never negative: a pass then holds one layer
    assert default_hessian_gib("cpu", 0) > 0


def test_quantize_leaves_given_hessians_alone():
    # Ready Hessians belong to the caller: the run solves on copies (calibrated ones are worked in place).
    layer = nn.Linear(16, 8)
    X = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    H = X.T @ X / 64
    given = H.clone()
    model = nn.Sequential(nn.Linear(16, 16), layer)
    config = avq.preset_config("w2a16", keep_fp=(), max_overhead_bits=None)
    hessians = {"0": torch.eye(16), "1": given}
    avq.quantize(model, config, hessians, progress=False)
    assert torch.equal(given, H)
