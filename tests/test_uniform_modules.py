"""Packed uniform layers (avq.core.uniform_modules): bit packing, forward, save/load (avq and diffusers)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
from diffusers import UNet2DModel
from safetensors.torch import load_file
from test_diffusers_backend import tiny_unet2d

import avq
from avq.calibration.activations import ActQuantizer, attach_input_quantizer, channel_dim_of, in_channels_of
from avq.core.modules import replace_module
from avq.core.uniform_modules import (
    UniformConv2d,
    UniformLinear,
    UniformModule,
    pack_codes,
    unpack_codes,
)
from avq.storage.format import FormatError


@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_round_trip_and_size(bits):
    codes = torch.randint(
        0, 2**bits, (7, 45), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits)
    )
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (7, math.ceil(45 * bits / 8))
    assert torch.equal(unpack_codes(packed, bits, 45), codes)


def test_pack_layout_is_little_endian_within_a_byte():
    codes = torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8)  # 2 bits each: 0b00_11_10_01
    assert pack_codes(codes, 2).tolist() == [[0b00111001]]


def same(a: avq.UniformQuantizedWeight, b: avq.UniformQuantizedWeight) -> bool:
    fields = ("bits", "shape", "group_size")
    tensors = ("codes", "scales", "zeros")
    return all(getattr(a, f) == getattr(b, f) for f in fields) and all(
        torch.equal(getattr(a, t), getattr(b, t)) for t in tensors
    )


def layer_and_result(kind: str, group_size: int | None, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if kind == "linear":
        layer = nn.Linear(48, 12)
    else:
        layer = nn.Conv2d(8, 12, 3, stride=2, padding=1)
    K = layer.weight[0].numel()
    X = torch.randn(4 * K, K, generator=gen)
    result = avq.quantize_weight_gptq(layer.weight.data, X.T @ X / len(X), 2, group_size=group_size)
    return layer, result


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("group_size", [None, 16])
def test_forward_is_the_dequantized_layer(kind, group_size):
    layer, result = layer_and_result(kind, group_size)
    module = UniformModule.from_layer(layer, result)
    assert isinstance(module, UniformLinear if kind == "linear" else UniformConv2d)
    assert module.total_bits == pytest.approx(result.total_bits)
    assert same(module.qweight, result)  # levels unpack to the solver's, grids are the stored fp16
    dense = type(layer)(*([48, 12] if kind == "linear" else [8, 12, 3]), **({} if kind == "linear" else {
        "stride": 2, "padding": 1}))  # fmt: skip
    with torch.no_grad():
        dense.weight.copy_(result.dequantize())
        dense.bias.copy_(layer.bias)
    x = torch.randn(3, 48) if kind == "linear" else torch.randn(2, 8, 9, 9)
    torch.testing.assert_close(module(x), dense(x), rtol=0, atol=1e-6)
    half = module.to(torch.float16)(x.half()).float()
    torch.testing.assert_close(half, dense(x), rtol=2e-2, atol=2e-2)


def test_module_checks_its_inputs():
    layer, result = layer_and_result("linear", None)
    with pytest.raises(TypeError, match="needs an avq.UniformQuantizedWeight"):
        UniformLinear(layer.weight)
    with pytest.raises(ValueError, match="needs a 4-D weight"):
        UniformConv2d(result)
    with pytest.raises(ValueError, match="bias has shape"):
        UniformLinear(result, torch.zeros(5))
    grouped = nn.Conv2d(8, 12, 3, groups=2)
    with pytest.raises(ValueError, match="does not fit"):
        UniformModule.from_layer(grouped, result)


def tiny_unet() -> UNet2DModel:
    return tiny_unet2d(num_class_embeds=None).eval()


LAYERS = {  # name -> (bits, group size)
    "down_blocks.0.resnets.0.conv1": (2, 24),
    "down_blocks.1.attentions.0.to_q": (4, None),  # no bias: buffers only, with an 8-bit input quantizer
    "time_embedding.linear_1": (3, 8),
}


def packed_unet() -> UNet2DModel:
    model, gen = tiny_unet(), torch.Generator().manual_seed(1)
    for name, (bits, group) in LAYERS.items():
        layer = model.get_submodule(name)
        K = layer.weight[0].numel()
        X = torch.randn(4 * K, K, generator=gen)
        result = avq.quantize_weight_gptq(layer.weight.data, X.T @ X / len(X), bits, group_size=group)
        replace_module(model, name, UniformModule.from_layer(layer, result))
    to_q = model.get_submodule("down_blocks.1.attentions.0.to_q")
    quantizer = ActQuantizer(in_channels_of(to_q), 8, (), channel_dim_of(to_q))
    quantizer.set_ranges(torch.tensor([-2.0]), torch.tensor([2.0]))
    attach_input_quantizer(to_q, quantizer)
    return model


def run(model: nn.Module) -> torch.Tensor:
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        return model(torch.randn(2, 1, 8, 8, generator=gen), torch.tensor([3, 700])).sample


def test_save_load_round_trip_through_avq_and_diffusers(tmp_path):
    model = packed_unet()
    expected = run(model)
    folder = avq.save_quantized(model, tmp_path / "q")
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert {n: (e["method"], e["bits"], e["group_size"]) for n, e in qc["layers"].items()} == {
        n: ("uniform", b, g) for n, (b, g) in LAYERS.items()
    }
    assert qc["activation_bits"] == 8
    tensors = load_file(folder / "model.safetensors")
    conv = "down_blocks.0.resnets.0.conv1"
    assert f"{conv}.weight" not in tensors  # nothing dense for a packed layer
    assert tensors[f"{conv}.packed"].dtype == torch.uint8 and tensors[f"{conv}.packed"].shape == (8, 18)
    assert tensors[f"{conv}.scales"].dtype == torch.float16 and tensors[f"{conv}.scales"].shape == (8, 3)

    loaded = avq.load_quantized(folder)
    assert torch.equal(run(loaded), expected)
    for name in LAYERS:
        a, b = model.get_submodule(name), loaded.get_submodule(name)
        assert type(a) is type(b) and same(a.qweight, b.qweight) and a.total_bits == b.total_bits
    through_diffusers = UNet2DModel.from_pretrained(folder)
    assert isinstance(through_diffusers.get_submodule(conv), UniformConv2d)
    assert torch.equal(run(through_diffusers.eval()), expected)


def test_bad_uniform_entries_and_tensors_are_named(tmp_path):
    folder = avq.save_quantized(packed_unet(), tmp_path / "q")
    config = json.loads((folder / "config.json").read_text())
    bad = json.loads(json.dumps(config))
    bad["quantization_config"]["layers"]["time_embedding.linear_1"]["bits"] = 9
    (folder / "config.json").write_text(json.dumps(bad))
    with pytest.raises(FormatError, match=r"'time_embedding.linear_1': bits must be an int from 2 to 8"):
        avq.load_quantized(folder)

    tensors = load_file(folder / "model.safetensors")
    tensors["time_embedding.linear_1.packed"] = tensors["time_embedding.linear_1.packed"][:, :-1].clone()
    with pytest.raises(FormatError, match=r"'time_embedding.linear_1': packed levels must be uint8"):
        layers = config["quantization_config"]["layers"]
        avq.storage.layers.quantized_layer(
            tiny_unet(), "time_embedding.linear_1", layers["time_embedding.linear_1"], tensors
        )
