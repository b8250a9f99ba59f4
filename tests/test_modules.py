"""AQLinear / AQConv2d: forward equals the dense layer with the decoded weight; construction and bits."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from avq import AQConv2d, AQLinear, QuantizedWeight, QuantSpec
from avq.core.modules import AQModule, replace_module
from avq.core.qweight import code_dtype


def random_qweight(shape: tuple[int, ...], spec: QuantSpec, seed: int = 0) -> QuantizedWeight:
    """A valid QuantizedWeight with random codes/codebooks/scales (no solver: fast)."""
    gen = torch.Generator().manual_seed(seed)
    out = shape[0]
    K = 1
    for d in shape[1:]:
        K *= d
    M, C, g = spec.num_codebooks, spec.codebook_size, spec.group_size
    codes = torch.randint(0, C, (out, K // g, M), generator=gen).to(code_dtype(spec.nbits))
    codebooks = torch.randn(M, C, g, generator=gen).half()
    scales = (torch.rand(out, generator=gen) + 0.5).half()
    return QuantizedWeight(spec, shape, codes, codebooks, scales)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("spec", [QuantSpec(2, 8, 4), QuantSpec(1, 16, 8), QuantSpec(3, 4, 2)])
def test_linear_forward_matches_dequantized(spec: QuantSpec, bias: bool) -> None:
    qw = random_qweight((6, 16), spec)
    b = torch.randn(6) if bias else None
    layer = AQLinear(qw, b)
    x = torch.randn(3, 5, 16)
    expected = F.linear(x, qw.dequantize(), b)
    assert torch.equal(layer(x), expected)
    assert layer.codes.dtype == code_dtype(spec.nbits)


@pytest.mark.parametrize(
    ("shape", "spec", "stride", "padding", "dilation"),
    [
        ((4, 3, 3, 3), QuantSpec(2, 8, 9, "kernel"), 1, 1, 1),  # KAQ g = 9
        ((4, 3, 3, 3), QuantSpec(1, 8, 9), 2, (1, 0), 1),
        ((4, 3, 3, 3), QuantSpec(1, 8, 3), 1, 2, 2),
        ((4, 3, 3, 3), QuantSpec(2, 4, 9, "kernel"), 1, "same", (2, 1)),
        ((5, 8, 1, 1), QuantSpec(1, 8, 4), 1, 0, 1),  # 1x1
        ((5, 8, 1, 1), QuantSpec(1, 8, 4, "kernel"), 2, 0, 1),  # 1x1 with kernel grouping = along K
    ],
)
@pytest.mark.parametrize("bias", [True, False])
def test_conv_forward_matches_dequantized(shape, spec, stride, padding, dilation, bias: bool) -> None:
    qw = random_qweight(shape, spec)
    b = torch.randn(shape[0]) if bias else None
    layer = AQConv2d(qw, b, stride=stride, padding=padding, dilation=dilation)
    x = torch.randn(2, shape[1], 9, 9)
    expected = F.conv2d(x, qw.dequantize(), b, stride, padding, dilation)
    got = layer(x)
    assert got.shape == expected.shape
    assert torch.equal(got, expected)


def test_forward_follows_input_dtype_and_keeps_storage_dtypes() -> None:
    qw = random_qweight((6, 16), QuantSpec(2, 8, 4))
    layer = AQLinear(qw, torch.randn(6, dtype=torch.float64))
    assert layer.bias.dtype == torch.float64  # kept as given
    assert layer.codebooks.dtype == torch.float16 and layer.scales.dtype == torch.float16
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(
        y, F.linear(x, qw.dequantize(torch.bfloat16), layer.bias.to(torch.bfloat16)), rtol=0, atol=0
    )
    layer.half()  # float casts must leave the integer codes alone
    assert layer.codes.dtype == torch.uint8


def test_gradient_reaches_codebooks_scales_and_bias() -> None:
    qw = random_qweight((4, 3, 3, 3), QuantSpec(2, 8, 9, "kernel"))
    layer = AQConv2d(qw, torch.zeros(4), padding=1)
    layer(torch.randn(2, 3, 5, 5)).square().sum().backward()
    for name in ("codebooks", "scales", "bias"):
        grad = getattr(layer, name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    # Only codewords some code points at can receive gradient.
    used = torch.zeros(2, 256, dtype=torch.bool)
    for m in range(2):
        used[m, layer.codes[..., m].long().flatten()] = True
    assert (layer.codebooks.grad.abs().sum(-1)[~used] == 0).all()
    assert not layer.codes.requires_grad
    assert {n for n, _ in layer.named_parameters()} == {"codebooks", "scales", "bias"}
    assert {n for n, _ in layer.named_buffers()} == {"codes"}


def test_qweight_property_and_bits() -> None:
    spec = QuantSpec(2, 8, 8)
    qw = random_qweight((16, 32), spec)
    layer = AQLinear(qw, torch.randn(16))
    back = layer.qweight
    for name in ("codes", "codebooks", "scales"):
        assert torch.equal(getattr(back, name), getattr(qw, name)), name
    assert back.spec == spec and back.shape == (16, 32)
    assert layer.code_bits == spec.code_bits == 2.0
    assert layer.total_bits == pytest.approx(qw.total_bits)
    # codes 2 bits/weight + 2*256*8 fp16 codebook entries + 16 fp16 scales over 512 weights; no bias
    assert layer.total_bits == pytest.approx(2 + (2 * 256 * 8 + 16) * 16 / 512)
    text = repr(layer)
    assert "spec=2x8g8" in text and "code_bits=2" in text and "total_bits=" in text


def test_qweight_property_rounds_trained_tensors_to_fp16() -> None:
    layer = AQLinear(random_qweight((6, 16), QuantSpec(1, 8, 4))).float()
    assert layer.codebooks.dtype == torch.float32
    assert layer.qweight.codebooks.dtype == torch.float16


def test_module_does_not_alias_source_tensors() -> None:
    """Training the quantized module must not edit the teacher layer or the QuantizedWeight."""
    dense = nn.Linear(16, 6)
    qw = random_qweight((6, 16), QuantSpec(1, 8, 4))
    layer = AQLinear.from_layer(dense, qw)
    with torch.no_grad():
        layer.bias.add_(1)
        layer.codebooks.add_(1)
    assert not torch.equal(layer.bias, dense.bias)
    assert not torch.equal(layer.codebooks, qw.codebooks)


def test_from_layer_linear_and_conv() -> None:
    dense = nn.Linear(16, 6)
    qw = random_qweight((6, 16), QuantSpec(2, 8, 4))
    layer = AQModule.from_layer(dense, qw)
    assert isinstance(layer, AQLinear)
    assert torch.equal(layer.bias, dense.bias)
    x = torch.randn(3, 16)
    assert torch.equal(layer(x), F.linear(x, qw.dequantize(), dense.bias))
    assert AQLinear.from_layer(nn.Linear(16, 6, bias=False), qw).bias is None

    conv = nn.Conv2d(3, 4, 3, stride=2, padding=(1, 2), dilation=(1, 2))
    cqw = random_qweight((4, 3, 3, 3), QuantSpec(1, 8, 9, "kernel"))
    aq = AQConv2d.from_layer(conv, cqw)
    assert isinstance(aq, AQConv2d)
    assert (aq.stride, aq.padding, aq.dilation) == ((2, 2), (1, 2), (1, 2))
    x = torch.randn(1, 3, 8, 8)
    assert torch.equal(aq(x), F.conv2d(x, cqw.dequantize(), conv.bias, 2, (1, 2), (1, 2)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_from_layer_adopts_layer_dtype(dtype: torch.dtype) -> None:
    """Parameters follow the replaced layer (diffusers reads a model's dtype off its first parameter);
    their values stay the stored fp16 ones and the forward is unchanged."""
    qw = random_qweight((6, 16), QuantSpec(2, 8, 4))
    layer = AQLinear.from_layer(nn.Linear(16, 6, dtype=dtype), qw)
    assert layer.codebooks.dtype == layer.scales.dtype == layer.bias.dtype == dtype
    assert torch.equal(layer.qweight.codebooks, qw.codebooks) and torch.equal(layer.qweight.scales, qw.scales)
    x = torch.randn(3, 16, dtype=dtype)
    assert torch.equal(layer(x), F.linear(x, qw.dequantize(dtype), layer.bias))
    assert AQLinear(qw).codebooks.dtype == torch.float16  # default: as stored
    with pytest.raises(ValueError, match="floating dtype"):
        AQLinear(qw, dtype=torch.int32)


def test_from_layer_rejects_what_it_cannot_represent() -> None:
    qw = random_qweight((4, 2, 3, 3), QuantSpec(1, 8, 9))
    with pytest.raises(ValueError, match="grouped convolution"):
        AQConv2d.from_layer(nn.Conv2d(4, 4, 3, groups=2), qw)
    qw = random_qweight((4, 4, 3, 3), QuantSpec(1, 8, 9))
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        AQConv2d.from_layer(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), qw)
    with pytest.raises(ValueError, match="does not fit"):
        AQConv2d.from_layer(nn.Conv2d(4, 4, 3), random_qweight((4, 2, 3, 3), QuantSpec(1, 8, 9)))
    with pytest.raises(TypeError, match="AQLinear.from_layer cannot take a Conv2d"):
        AQLinear.from_layer(nn.Conv2d(4, 4, 3), qw)
    with pytest.raises(TypeError, match="nn.Linear and nn.Conv2d"):
        AQModule.from_layer(nn.Conv1d(4, 4, 3), qw)


def test_constructor_checks() -> None:
    with pytest.raises(ValueError, match="needs a 2-D weight"):
        AQLinear(random_qweight((4, 4, 3, 3), QuantSpec(1, 8, 9)))
    with pytest.raises(ValueError, match="needs a 4-D weight"):
        AQConv2d(random_qweight((4, 16), QuantSpec(1, 8, 4)))
    with pytest.raises(ValueError, match="bias has shape"):
        AQLinear(random_qweight((4, 16), QuantSpec(1, 8, 4)), torch.zeros(5))
    with pytest.raises(TypeError, match="QuantizedWeight"):
        AQLinear(torch.zeros(4, 16))
    with pytest.raises(ValueError, match="padding"):
        AQConv2d(random_qweight((4, 4, 3, 3), QuantSpec(1, 8, 9)), padding="full")


def test_replace_module() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.ReLU(), nn.ModuleDict({"a": nn.Linear(4, 4)})))
    new = nn.Identity()
    old = replace_module(model, "1.1.a", new)
    assert isinstance(old, nn.Linear)
    assert model.get_submodule("1.1.a") is new
    with pytest.raises(AttributeError, match="no submodule '1.2.a'"):
        replace_module(model, "1.2.a", new)
    with pytest.raises(AttributeError, match="no submodule '1.1.b'"):
        replace_module(model, "1.1.b", new)
    with pytest.raises(ValueError, match="root"):
        replace_module(model, "", new)
