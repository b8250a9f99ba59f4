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
