"""save_quantized / load_quantized: bit-exact round trip of a real (tiny) diffusers model, atomic saves,
and a clear error for every malformed folder."""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Callable
from copy import deepcopy
from pathlib import Path

import diffusers
import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode

import avq
import avq.storage.serialization as serialization
from avq import AQConv2d, AQLinear, QuantSpec, load_quantized, save_quantized
from avq.core.modules import AQModule, replace_module
from avq.storage import atomic as fileio
from avq.storage.format import DIFFUSERS_WEIGHTS_NAME, config_digest
from avq.storage.serialization import FormatError

# Layer -> spec: kernel grouping (g=9) on a 1-input-channel conv, B=4 (M=2) and B=16 codes, a strided conv,
# a 1x1 conv. Kept small: the solver dominates this file's run time.
QUANTIZED = {
    "conv_in": QuantSpec(1, 8, 9, "kernel"),
    "time_embedding.linear_1": QuantSpec(2, 4, 4),
    "down_blocks.0.downsamplers.0.conv": QuantSpec(1, 8, 8),
    "down_blocks.1.attentions.0.to_q": QuantSpec(1, 16, 8),
    "down_blocks.1.resnets.0.conv_shortcut": QuantSpec(1, 8, 4),
}


def tiny_unet() -> diffusers.UNet2DModel:
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )


def quantize_some(model: nn.Module) -> nn.Module:
    """Replace the QUANTIZED layers by AQ modules, solved against Hessians of random inputs."""
    gen = torch.Generator().manual_seed(1)
    for name, spec in QUANTIZED.items():
        layer = model.get_submodule(name)
        K = layer.weight[0].numel()
        X = torch.randn(4 * K, K, generator=gen)
        qweight = avq.quantize_weight(layer.weight, X.T @ X / X.shape[0], spec, max_rounds=1)
        replace_module(model, name, AQModule.from_layer(layer, qweight))
    return model.eval()


def sample_input() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([3, 700])


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


@pytest.fixture(scope="module")
def quantized() -> nn.Module:
    return quantize_some(tiny_unet())


@pytest.fixture(scope="module")
def saved(quantized: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("save") / "model"
    assert save_quantized(quantized, folder, extra_config={"preset": "w2a16", "path": Path("x")}) == folder
    return folder


@pytest.fixture
def copy(saved: Path, tmp_path: Path) -> Path:
    """A private copy of the saved folder, for tests that damage it."""
    return Path(shutil.copytree(saved, tmp_path / "copy"))


def rewrite(
    folder: Path,
    tensors: Callable[[dict], None] | None = None,
    config: Callable[[dict], None] | None = None,
    fix_checksum: bool = True,
) -> None:
    """Edit a saved folder's tensors and/or config; by default re-record the checksums (weights and model
    config) so that the damage reaches the checks behind them. The folder is left with `model.safetensors`
    alone (its copy under diffusers' name would no longer match)."""
    weights, config_path = folder / "model.safetensors", folder / "config.json"
    (folder / DIFFUSERS_WEIGHTS_NAME).unlink(missing_ok=True)
    data = json.loads(config_path.read_text())
    if tensors is not None:
        state = load_file(weights)
        tensors(state)
        save_file(state, weights)
    if config is not None:
        config(data)
    if fix_checksum:
        data["quantization_config"]["checksum"]["model.safetensors"] = f"sha256:{fileio.sha256_file(weights)}"
        data["quantization_config"]["checksum"]["config.json"] = config_digest(data)
    config_path.write_text(json.dumps(data))


# ---------------------------------------------------------------------------------------- round trip
def test_tiny_unet_constructs_and_runs() -> None:
    model = tiny_unet()
    assert isinstance(model.get_submodule("conv_in"), nn.Conv2d)
    x, t = sample_input()
    assert model(x, t).sample.shape == (2, 1, 8, 8)


def test_round_trip_is_bit_exact(quantized: nn.Module, saved: Path) -> None:
    loaded = load_quantized(saved)  # no model=: built from config.json's _class_name
    assert type(loaded) is diffusers.UNet2DModel
    assert not loaded.training
    # diffusers takes the model dtype from the first parameter (conv_in.codebooks here): must stay fp32
    assert quantized.dtype == loaded.dtype == torch.float32
    original, restored = quantized.state_dict(), loaded.state_dict()
    assert list(original) == list(restored)
    for key, tensor in original.items():
        assert bitwise_equal(tensor, restored[key]), key
    for name, spec in QUANTIZED.items():
        before, after = quantized.get_submodule(name), loaded.get_submodule(name)
        assert type(after) is type(before) and after.spec == spec and after.shape == before.shape
        if isinstance(after, AQConv2d):
            assert (after.stride, after.padding, after.dilation) == (
                before.stride,
                before.padding,
                before.dilation,
            )
    assert loaded.get_submodule("down_blocks.0.downsamplers.0.conv").stride == (2, 2)
    x, t = sample_input()
    with torch.no_grad():
        assert torch.equal(quantized(x, t).sample, loaded(x, t).sample)


class _CPUWrites(TorchDispatchMode):
    """The shapes of the CPU tensors that the ops run inside the block write (`empty` reserves address
    space, and the pages of a tensor never written stay out of memory)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        empty = func.overloadpacket in (torch.ops.aten.empty, torch.ops.aten.empty_strided)
        if isinstance(out, torch.Tensor) and out.device.type == "cpu" and not empty:
            self.shapes.append(tuple(out.shape))
        return out


def test_loading_never_writes_a_quantized_layers_dense_weight(saved: Path) -> None:
    """The skeleton's parameters live on the meta device: no dense weight of a quantized layer is
    initialised only to be replaced, so loading a W2 model never holds its FP weights."""
    dense = tiny_unet().state_dict()
    others = {tuple(t.shape) for k, t in dense.items() if not any(k.startswith(f"{n}.") for n in QUANTIZED)}
    shapes = {tuple(dense[f"{name}.weight"].shape) for name in QUANTIZED} - others  # only quantized layers'
    assert len(shapes) >= 3
    with _CPUWrites() as seen:
        loaded = load_quantized(saved)
    assert seen.shapes and not shapes & set(seen.shapes), shapes & set(seen.shapes)
    assert not any(t.is_meta for t in loaded.state_dict().values())


def test_codes_dtypes_in_file(saved: Path) -> None:
    with safe_open(saved / "model.safetensors", framework="pt") as f:
        dtypes = {key: f.get_slice(key).get_dtype() for key in f.keys()}
    assert dtypes["down_blocks.1.attentions.0.to_q.codes"] == "U16"  # B = 16
    assert dtypes["time_embedding.linear_1.codes"] == "U8"  # B = 4
    assert dtypes["conv_in.codes"] == "U8"
    assert dtypes["conv_in.codebooks"] == dtypes["conv_in.scales"] == "F16"
    assert dtypes["conv_in.bias"] == dtypes["conv_out.weight"] == "F32"
    assert "conv_in.weight" not in dtypes


def test_config_contents(saved: Path) -> None:
    config = json.loads((saved / "config.json").read_text())
    assert config["_class_name"] == "UNet2DModel"
    assert config["block_out_channels"] == [8, 16]
    qc = config["quantization_config"]
    assert (qc["format"], qc["version"], qc["activation_bits"]) == ("avq", 1, 16)
    assert qc["checksum"]["model.safetensors"] == f"sha256:{fileio.sha256_file(saved / 'model.safetensors')}"
    assert qc["extra"] == {"preset": "w2a16", "path": "x"}
    assert set(qc["layers"]) == set(QUANTIZED)
    assert qc["layers"]["time_embedding.linear_1"] == {
        "kind": "linear",
        "spec": QuantSpec(2, 4, 4).to_dict(),
        "shape": [32, 8],
        "bias": True,
        "param_dtype": "float32",  # the dtype of the layer it replaced; the file holds fp16
    }
    conv = qc["layers"]["down_blocks.0.downsamplers.0.conv"]
    assert conv["kind"] == "conv2d" and conv["shape"] == [8, 8, 3, 3]
    assert (conv["stride"], conv["padding"], conv["dilation"]) == ([2, 2], [1, 1], [1, 1])


def test_load_into_given_model(quantized: nn.Module, saved: Path) -> None:
    for skeleton in (tiny_unet(), deepcopy(quantized)):  # dense layers, or AQ layers already in place
        loaded = load_quantized(saved, model=skeleton)
        assert loaded is skeleton
        for key, tensor in quantized.state_dict().items():
            assert bitwise_equal(tensor, loaded.state_dict()[key]), key


def test_half_model_round_trip(quantized: nn.Module, tmp_path: Path) -> None:
    """Every tensor keeps the dtype it was saved in (AQ parameters via param_dtype)."""
    model = deepcopy(quantized).half()
    save_quantized(model, tmp_path / "half")
    loaded = load_quantized(tmp_path / "half")
    for key, tensor in model.state_dict().items():
        assert bitwise_equal(tensor, loaded.state_dict()[key]), key


def test_plain_module_without_config(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    dense = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    qweight = avq.quantize_weight(dense[0].weight, torch.eye(8), QuantSpec(1, 8, 4), max_rounds=1)
    replace_module(dense, "0", AQLinear.from_layer(dense[0], qweight))
    save_quantized(dense, tmp_path / "plain")
    assert "_class_name" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    with pytest.raises(FormatError, match="no _class_name.*pass model="):
        load_quantized(tmp_path / "plain")
    loaded = load_quantized(
        tmp_path / "plain", model=nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    )
    x = torch.randn(3, 8, generator=gen)
    assert torch.equal(loaded(x), dense(x))


def test_tied_weights_save(tmp_path: Path) -> None:
    """safetensors refuses tensors that share memory; the saver copies repeats instead of failing."""

    def tied() -> nn.Module:
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        model[1].weight = model[0].weight
        return model

    model = tied()
    save_quantized(model, tmp_path / "tied")
    loaded = load_quantized(tmp_path / "tied", model=tied())
    for key, tensor in model.state_dict().items():
        assert bitwise_equal(tensor, loaded.state_dict()[key]), key


# ---------------------------------------------------------------------------------------- atomic save
def test_saved_folder_mode_follows_umask(saved: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(saved.stat().st_mode) == 0o777 & ~umask


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_save_replaces_previous_save_and_leaves_nothing_behind(quantized: nn.Module, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    save_quantized(nn.Sequential(), folder)
    save_quantized(quantized, folder)
    assert sorted(os.listdir(tmp_path)) == ["model"]
    assert sorted(os.listdir(folder)) == ["config.json", DIFFUSERS_WEIGHTS_NAME, "model.safetensors"]
    assert isinstance(load_quantized(folder).get_submodule("conv_in"), AQConv2d)


def test_failed_write_leaves_prior_folder_intact(
    quantized: nn.Module, saved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = Path(shutil.copytree(saved, tmp_path / "model"))
    before = folder_bytes(folder)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(serialization, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(quantized, folder)
    assert folder_bytes(folder) == before
    assert sorted(os.listdir(tmp_path)) == ["model"]  # no temporary folder left


def test_failed_swap_restores_prior_folder(
    quantized: nn.Module, saved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = Path(shutil.copytree(saved, tmp_path / "model"))
    before = folder_bytes(folder)
    real_rename = os.rename

    def rename(src, dst):
        if Path(src).name.startswith(".model.tmp-"):
            raise OSError("rename failed")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        save_quantized(quantized, folder)
    monkeypatch.undo()
    assert folder_bytes(folder) == before
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_save_refuses_folder_with_foreign_files(quantized: nn.Module, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FormatError, match="refusing to replace.*notes.txt"):
        save_quantized(quantized, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(FormatError, match="not a folder"):
        save_quantized(quantized, tmp_path / "notes.txt")


def test_save_rejects_non_json_extra_config(quantized: nn.Module, tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="extra_config is not JSON-safe"):
        save_quantized(quantized, tmp_path / "model", extra_config={"f": object()})
    assert not (tmp_path / "model").exists()
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------- bad folders
def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="folder .* not found"):
        load_quantized(tmp_path / "nope")


def test_missing_config(copy: Path) -> None:
    (copy / "config.json").unlink()
    with pytest.raises(FormatError, match="config.json is missing"):
        load_quantized(copy)


def test_config_not_json(copy: Path) -> None:
    (copy / "config.json").write_text("{not json")
    with pytest.raises(FormatError, match="not valid JSON"):
        load_quantized(copy)


def test_config_without_quantization_config(copy: Path) -> None:
    rewrite(copy, config=lambda c: c.pop("quantization_config"), fix_checksum=False)
    with pytest.raises(FormatError, match="no quantization_config block"):
        load_quantized(copy)


@pytest.mark.parametrize("version", [2, None])
def test_unknown_version(copy: Path, version) -> None:
    rewrite(copy, config=lambda c: c["quantization_config"].update(version=version))
    with pytest.raises(FormatError, match=f"unsupported quantization_config version {version}"):
        load_quantized(copy)


def test_unsupported_activation_bits(copy: Path) -> None:
    rewrite(copy, config=lambda c: c["quantization_config"].update(activation_bits=4))
    with pytest.raises(FormatError, match="activation_bits=4 is not supported"):
        load_quantized(copy)


def test_missing_weights(copy: Path) -> None:
    (copy / "model.safetensors").unlink()
    (copy / DIFFUSERS_WEIGHTS_NAME).unlink()  # either name alone would do (tests/test_diffusers_backend.py)
    with pytest.raises(FormatError, match="model.safetensors is missing"):
        load_quantized(copy)


def test_checksum_mismatch(copy: Path) -> None:
    path = copy / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # one bit of one weight
    path.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="checksum mismatch.*tampered or corrupted"):
        load_quantized(copy)


def test_missing_checksum(copy: Path) -> None:
    rewrite(copy, config=lambda c: c["quantization_config"].pop("checksum"), fix_checksum=False)
    with pytest.raises(FormatError, match="checksum has no 'sha256:<hex>' entry"):
        load_quantized(copy)


def test_truncated_file(copy: Path) -> None:
    path = copy / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(FormatError, match="tampered or corrupted"):
        load_quantized(copy)
    rewrite(copy)  # a consistent checksum: now safetensors itself must notice
    with pytest.raises(FormatError, match="truncated or not a valid safetensors file"):
        load_quantized(copy)


@pytest.mark.parametrize("key", ["conv_in.codes", "time_embedding.linear_1.bias", "conv_out.weight"])
def test_missing_tensor(copy: Path, key: str) -> None:
    rewrite(copy, tensors=lambda t: t.pop(key))
    with pytest.raises(FormatError, match=f"missing tensor.*'{key}'"):
        load_quantized(copy)


@pytest.mark.parametrize("key", ["foo.bar", "conv_in.weight"])
def test_unexpected_tensor(copy: Path, key: str) -> None:
    rewrite(copy, tensors=lambda t: t.update({key: torch.zeros(2)}))
    with pytest.raises(FormatError, match=f"unexpected tensor.*'{key}'"):
        load_quantized(copy)


@pytest.mark.parametrize(
    ("key", "change", "match"),
    [
        ("conv_in.codes", lambda t: t.to(torch.int32), "conv_in.*codes has dtype torch.int32"),
        ("down_blocks.1.attentions.0.to_q.codes", lambda t: t.to(torch.int32).to(torch.uint8), "dtype"),
        ("conv_in.codebooks", lambda t: t.float(), "codebooks has dtype torch.float32"),
        ("conv_in.scales", lambda t: t[:-1], "scales has shape"),
        ("conv_out.weight", lambda t: t[:, :-1], "'conv_out.weight' has shape"),
        ("conv_norm_out.weight", lambda t: t.to(torch.int64), "'conv_norm_out.weight' has dtype torch.int64"),
        ("conv_in.codebooks", lambda t: torch.full_like(t, float("nan")), "codebooks contains NaN"),
    ],
)
def test_wrong_dtype_or_shape(copy: Path, key: str, change, match: str) -> None:
    rewrite(copy, tensors=lambda t: t.update({key: change(t[key]).contiguous()}))
    with pytest.raises(FormatError, match=match):
        load_quantized(copy)


def test_codes_out_of_range(copy: Path) -> None:
    def damage(tensors: dict) -> None:
        codes = tensors["time_embedding.linear_1.codes"].clone()  # B = 4: codes must be < 16
        codes[0, 0, 0] = 16
        tensors["time_embedding.linear_1.codes"] = codes

    rewrite(copy, tensors=damage)
    with pytest.raises(FormatError, match="time_embedding.linear_1.*holds 16, out of range for 4-bit codes"):
        load_quantized(copy)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda c: c.pop("_class_name"), "no _class_name.*pass model="),
        (
            lambda c: c.update(_class_name="NoSuchModel"),
            "'NoSuchModel' is not a diffusers model class.*model=",
        ),
        (lambda c: c.update(_class_name="DDIMScheduler"), "not a diffusers model class"),
    ],
)
def test_bad_class_name(copy: Path, change, match: str) -> None:
    rewrite(copy, config=change)
    with pytest.raises(FormatError, match=match):
        load_quantized(copy)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda L: L.update({"no.such.layer": L.pop("conv_in")}), "layer 'no.such.layer' does not exist"),
        (lambda L: L["conv_in"].update(kind="linear"), "shape must be 2 positive ints"),
        (lambda L: L["conv_in"].update(kind="conv3d"), "kind must be"),
        (lambda L: L["conv_in"].update(spec={"num_codebooks": 1}), "conv_in.*invalid spec"),
        (lambda L: L["conv_in"].update(shape=[8, 1, 3, 4]), "weight shape \\[8, 1, 3, 3\\] in the model"),
        (lambda L: L["conv_in"]["spec"].update(group_size=3), "kernel grouping needs group_size"),
        (lambda L: L["conv_in"].update(stride="2"), "stride must be a pair of ints"),
        (lambda L: L["conv_in"].update(bias=False), "unexpected tensor.*'conv_in.bias'"),
        (lambda L: L["conv_in"].update(param_dtype="int8"), "param_dtype must be one of"),
    ],
)
def test_bad_layer_entry(copy: Path, change, match: str) -> None:
    rewrite(copy, config=lambda c: change(c["quantization_config"]["layers"]))
    with pytest.raises(FormatError, match=match):
        load_quantized(copy)


def test_failed_load_leaves_given_model_untouched(copy: Path) -> None:
    rewrite(copy, tensors=lambda t: t.pop("conv_out.weight"))  # found only after every layer was built
    model = tiny_unet()
    before = {key: tensor.clone() for key, tensor in model.state_dict().items()}
    with pytest.raises(FormatError, match="missing tensor.*'conv_out.weight'"):
        load_quantized(copy, model=model)
    assert not any(isinstance(m, AQModule) for m in model.modules())
    after = model.state_dict()
    assert list(after) == list(before) and all(bitwise_equal(before[k], after[k]) for k in before)


def test_layer_kind_mismatch_with_given_model(copy: Path) -> None:
    class Wrong(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv_in = nn.Linear(4, 4)

    with pytest.raises(FormatError, match="'conv_in' is a Linear in the model, but saved as conv2d"):
        load_quantized(copy, model=Wrong())


def test_write_json_atomic_keeps_old_file_on_failure(tmp_path):
    from avq.storage.atomic import write_json_atomic

    target = write_json_atomic(tmp_path / "sub" / "figures.json", {"fid": 3.2})
    assert json.loads(target.read_text()) == {"fid": 3.2}
    with pytest.raises(TypeError):
        write_json_atomic(target, {"fid": object()})  # not serialisable
    assert json.loads(target.read_text()) == {"fid": 3.2}  # the old file, whole
    assert [p.name for p in target.parent.iterdir()] == ["figures.json"]  # no temporary left behind
