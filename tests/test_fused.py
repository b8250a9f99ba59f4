"""The native fused decode-GEMM (`kernels/fused.py`, native.c "fused GEMM"): the conv or Linear of the
decoded weight, in each input layout, and the dispatcher's use of it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_kernels import random_qweight

from avq import AQConv2d, AQLinear, QuantSpec
from avq.kernels import autotune, choice, conv, fused, native, routes, weights

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not native.available(), reason="no C compiler: no native kernels"),
]


def _reference(layer: AQConv2d, x: torch.Tensor) -> torch.Tensor:
    weight = weights.dense_weight(layer, torch.float32).view(layer.shape).clone()
    return F.conv2d(x.double(), weight.double(), _bias(layer), layer.stride, layer.padding, layer.dilation)


def _bias(layer: AQConv2d) -> torch.Tensor | None:
    return None if layer.bias is None else layer.bias.detach().double()


def _fused(layer: AQConv2d, x: torch.Tensor, parallel: bool | None = None):
    bias = None if layer.bias is None else layer.bias.detach().float()
    books, scales = layer.codebooks.detach().float(), layer.scales.detach().float()
    geometry = (layer.stride, layer.padding, layer.dilation)
    return fused.conv2d(x, layer.codes, books, scales, bias, layer.shape, *geometry, parallel)


# (out, in, kernel, spatial input, batch, conv kwargs, spec, layout)
CASES = [
    (16, 8, 3, (8, 8), 1, {"padding": 1}, QuantSpec(1, 8, 4), "padded"),  # one pair of runs per row pair
    (7, 8, 3, (16, 16), 2, {"padding": 1}, QuantSpec(2, 8, 8), "padded"),  # 7 channels: a partial block
    (12, 4, 3, (10, 8), 1, {"padding": 1, "stride": (2, 1)}, QuantSpec(3, 6, 4), "padded"),  # odd runs
    (6, 8, 3, (9, 8), 3, {"padding": 2, "dilation": 2}, QuantSpec(1, 12, 8), "padded"),  # uint16 codes
    (13, 8, 3, (17, 16), 1, {"padding": 1}, QuantSpec(1, 8, 4), "padded"),  # 16-wide, a partial group
    (5, 4, 3, (8, 32), 1, {"padding": 1}, QuantSpec(1, 12, 4), "padded"),  # 16-wide, uint16 codes
    (9, 8, 2, (8, 8), 1, {"padding": "same"}, QuantSpec(2, 4, 2), "padded"),  # "same": one more at the end
    (8, 16, 3, (4, 4), 2, {"padding": 1}, QuantSpec(1, 8, 4), "unfold"),  # 4x4 outputs: runs span rows
    (8, 4, 3, (8, 8), 1, {"padding": 1, "stride": 2}, QuantSpec(2, 5, 4), "unfold"),
    (8, 4, 2, (4, 4), 1, {"padding": "same"}, QuantSpec(1, 4, 4), "unfold"),
    (10, 32, 1, (4, 4), 3, {}, QuantSpec(1, 8, 8), "flat"),
    (10, 12, 3, (4, 4), 1, {"padding": 1}, QuantSpec(1, 4, 9, "kernel"), "unfold"),  # KAQ: g = kh*kw
]


@torch.no_grad()
@pytest.mark.parametrize("case", CASES, ids=[c[-1] + str(i) for i, c in enumerate(CASES)])
@pytest.mark.parametrize("bias", [True, False])
def test_the_fused_conv_is_the_conv_of_the_decoded_weight(case, bias: bool) -> None:
    out, cin, k, hw, batch, kwargs, spec, layout = case
    qweight = random_qweight((out, cin, k, k), spec, seed=out + cin)
    layer = AQConv2d(qweight, bias=torch.randn(out) if bias else None, **kwargs).eval()
    x = torch.randn(batch, cin, *hw)
    pads = conv.explicit_padding(layer.padding, (k, k), layer.dilation)
    plan = fused.conv_layout(tuple(x.shape), out, (k, k), layer.stride, pads, layer.dilation)
    assert plan is not None and plan[0] == layout
    ref = _reference(layer, x)
    for parallel in (False, True):  # one thread, and the work split over two
        torch.set_num_threads(1 + parallel)
        got = _fused(layer, x, parallel)(x)
        assert got.shape == ref.shape and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-5 * max(1.0, ref.abs().max()))
    # channels-last input: read through a contiguous copy
    got = _fused(layer, x)(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-5 * max(1.0, ref.abs().max()))


@torch.no_grad()
def test_outputs_not_in_runs_of_eight_are_declined() -> None:
    layer = AQConv2d(random_qweight((8, 4, 3, 3), QuantSpec(1, 8, 4)), padding=1).eval()
    for hw in ((6, 6), (5, 4), (3, 3)):  # 36, 20, 9 outputs
        x = torch.randn(1, 4, *hw)
        assert _fused(layer, x) is None and not fused.takes_conv(x, layer)
    assert fused.takes_conv(torch.randn(1, 4, 4, 4), layer)
    assert not fused.takes_conv(torch.randn(1, 4, 4, 4).double(), layer)


@torch.no_grad()
def test_the_dispatcher_measures_the_fused_conv_and_serves_it(tmp_path, monkeypatch) -> None:
    """A conv it takes has it among the measured candidates; when it wins (here: the decode is made slow),
    every later call runs it, with the conv's output."""
    monkeypatch.setenv("AVQ_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("AVQ_KERNEL", raising=False)
    autotune.forget()
    qweight = random_qweight((16, 8, 3, 3), QuantSpec(1, 8, 4))
    layer = AQConv2d(qweight, bias=torch.randn(16), padding=1).eval()
    x = torch.randn(1, 8, 8, 8)
    assert choice.conv_candidates(layer, x) == ("dequant", "fused")
    ref = _reference(layer, x)
    real = weights.decoder

    def slow_decoder(*args, **kwargs):
        decode = real(*args, **kwargs)
        return lambda: (torch.ones(200, 200) @ torch.ones(200, 200), decode())[1]

    monkeypatch.setattr(weights, "decoder", slow_decoder)
    try:
        for _ in range(2):
            torch.testing.assert_close(layer(x).double(), ref, rtol=0, atol=1e-5 * ref.abs().max())
        assert routes.kernel_of(layer) == "fused"
        key = choice.conv_measured_key(layer, x, 64, choice.conv_candidates(layer, x))
        assert autotune.chosen(key) == "fused"
        # a call of the same row bucket that the fused kernel does not take is measured without it
        y = torch.randn(1, 8, 6, 6)  # 36 outputs, bucket 64
        torch.testing.assert_close(layer(y).double(), _reference(layer, y), rtol=0, atol=1e-4)
        assert routes.kernel_of(layer) == "dequant"
    finally:
        autotune.forget()


@torch.no_grad()
@pytest.mark.parametrize(
    ("lead", "out", "K", "spec"),
    [
        ((8,), 16, 32, QuantSpec(1, 8, 4)),
        ((2, 8), 7, 64, QuantSpec(2, 8, 8)),  # 3-d input, a partial block of channels
        ((64,), 13, 24, QuantSpec(3, 5, 2)),
        ((1, 77), 12, 16, QuantSpec(1, 8, 4)),  # 77 text tokens: padded to 80 rows
        ((9,), 6, 8, QuantSpec(2, 4, 4)),  # 9 rows: padded to 16
    ],
)
@pytest.mark.parametrize("bias", [True, False])
def test_the_fused_linear_is_the_linear_of_the_decoded_weight(lead, out, K, spec, bias: bool) -> None:
    layer = AQLinear(random_qweight((out, K), spec, seed=K), bias=torch.randn(out) if bias else None).eval()
    x = torch.randn(*lead, K)
    weight = weights.dense_weight(layer, torch.float32).clone().double()
    ref = F.linear(x.double(), weight, _bias(layer))
    for parallel in (False, True):
        torch.set_num_threads(1 + parallel)
        got = fused.linear(x, *weights.fused_inputs(layer), parallel)(x)
        assert got.shape == ref.shape and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-5 * max(1.0, ref.abs().max()))
    assert "fused" in choice.linear_candidates(layer, x, x.numel() // K)
    few = torch.randn(5, K)  # 5 rows: padding would be most of the work
    assert fused.linear(few, *weights.fused_inputs(layer)) is None
    assert "fused" not in choice.linear_candidates(layer, few, 5)


@torch.no_grad()
def test_avq_kernel_fused_forces_it_where_it_takes_the_call_and_decodes_elsewhere(monkeypatch) -> None:
    monkeypatch.setenv("AVQ_KERNEL", "fused")
    conv_layer = AQConv2d(random_qweight((8, 4, 3, 3), QuantSpec(1, 8, 4)), padding=1).eval()
    linear_layer = AQLinear(random_qweight((12, 16), QuantSpec(1, 8, 4)), bias=torch.randn(12)).eval()
    weight = weights.dense_weight(linear_layer, torch.float32).clone().double()
    calls = [
        (conv_layer, torch.randn(1, 4, 8, 8), "fused"),
        (conv_layer, torch.randn(1, 4, 6, 6), "dequant"),  # 36 outputs: not in runs of 8
        (linear_layer, torch.randn(16, 16), "fused"),
        (linear_layer, torch.randn(3, 16), "dequant"),  # 3 rows: below a run
    ]
    for layer, x, kernel in calls:
        if isinstance(layer, AQConv2d):
            ref = _reference(layer, x)
        else:
            ref = F.linear(x.double(), weight, _bias(layer))
        torch.testing.assert_close(layer(x).double(), ref, rtol=0, atol=1e-5 * max(1.0, ref.abs().max()))
        assert routes.kernel_of(layer) == kernel
