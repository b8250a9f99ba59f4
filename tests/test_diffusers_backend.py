"""diffusers' own `from_pretrained` on avq folders (avq.storage.diffusers_backend): bit-exact with
`avq.load_quantized`, for a class-conditional `UNet2DModel`, a `UNet2DConditionModel` in a pipeline's `unet/`
subfolder and a whole `DiffusionPipeline`; the weights file under both names; the checksum of the model
config; newer format versions refused. The diffusers internals the backend relies on are pinned here, so
that a diffusers upgrade that moves them fails loudly.

diffusers loads quantized models only through `accelerate`: the tests that call `from_pretrained` are
skipped without it.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path

import diffusers
import pytest
import torch
import torch.nn as nn
from diffusers import (
    DDPMPipeline,
    DDPMScheduler,
    DiffusionPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from diffusers.quantizers import auto as diffusers_auto
from diffusers.quantizers.base import DiffusersQuantizer
from diffusers.quantizers.quantization_config import QuantizationConfigMixin
from diffusers.utils import is_accelerate_available
from safetensors.torch import load_file, save_file

import avq
import avq.storage.serialization as serialization
from avq import QuantSpec
from avq.calibration.activations import ActQuantizer, attach_input_quantizer, channel_dim_of, in_channels_of
from avq.core.modules import AQModule, replace_module
from avq.storage import diffusers_backend as backend
from avq.storage import diffusers_registry as registry
from avq.storage.atomic import sha256_file
from avq.storage.format import (
    DIFFUSERS_WEIGHTS_NAME,
    VERSION,
    WEIGHTS_NAME,
    FormatError,
    config_digest,
)

pytestmark = pytest.mark.usefixtures("one_thread")
needs_accelerate = pytest.mark.skipif(
    not is_accelerate_available(),
    reason="diffusers loads quantized models only through accelerate (pip install accelerate)",
)


# ---------------------------------------------------------------------------------------- models
def tiny_unet2d(num_class_embeds: int | None = 3) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        num_class_embeds=num_class_embeds,
    )


def tiny_cond_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=2,
        out_channels=2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        cross_attention_dim=8,
        attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )


# Layer -> spec. UNet2D: kernel grouping, B=4 with M=2, B=16 (uint16 codes); the conv gets an 8-bit input
# quantizer with two segments, and so does a Linear that stays dense.
UNET2D_LAYERS = {
    "conv_in": QuantSpec(1, 8, 9, "kernel"),
    "time_embedding.linear_1": QuantSpec(2, 4, 4),
    "down_blocks.0.resnets.0.conv1": QuantSpec(1, 8, 8),
    "down_blocks.1.attentions.0.to_q": QuantSpec(1, 16, 8),
}
UNET2D_ACTIVATIONS = {"down_blocks.0.resnets.0.conv1": (3,), "time_embedding.linear_2": ()}
COND_LAYERS = {
    "conv_in": QuantSpec(1, 8, 9, "kernel"),
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": QuantSpec(1, 8, 4),
    "mid_block.resnets.0.conv2": QuantSpec(1, 8, 8),
}
COND_ACTIVATIONS = {"mid_block.resnets.0.conv2": ()}


def quantize_layers(
    model: nn.Module, layers: dict[str, QuantSpec], activations: dict[str, tuple]
) -> nn.Module:
    """Replace `layers` by AQ modules (solved against Hessians of random inputs) and attach 8-bit input
    quantizers to `activations` (with these channel splits), as `avq.calibration.activations` does."""
    gen = torch.Generator().manual_seed(1)
    for name, spec in layers.items():
        layer = model.get_submodule(name)
        K = layer.weight[0].numel()
        X = torch.randn(4 * K, K, generator=gen)
        qweight = avq.quantize_weight(layer.weight, X.T @ X / X.shape[0], spec, max_rounds=1)
        replace_module(model, name, AQModule.from_layer(layer, qweight))
    for name, splits in activations.items():
        layer = model.get_submodule(name)
        quantizer = ActQuantizer(in_channels_of(layer), 8, splits, channel_dim_of(layer))
        segments = len(splits) + 1
        quantizer.set_ranges(
            -torch.rand(segments, generator=gen) - 0.5, torch.rand(segments, generator=gen) + 0.5
        )
        attach_input_quantizer(layer, quantizer)
    return model.eval()


def unet2d_input(model: nn.Module) -> tuple:
    gen = torch.Generator().manual_seed(2)
    return (torch.randn(2, 1, 8, 8, generator=gen), torch.tensor([3, 700])), {
        "class_labels": torch.tensor([0, 2])
    }


def cond_input(model: nn.Module) -> tuple:
    gen = torch.Generator().manual_seed(2)
    sample, context = torch.randn(2, 2, 8, 8, generator=gen), torch.randn(2, 3, 8, generator=gen)
    return (sample, torch.tensor([3, 700])), {"encoder_hidden_states": context}


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


def assert_same_model(expected: nn.Module, actual: nn.Module, make_input: Callable | None = None) -> None:
    """Same modules (types, specs), same state dict (names, order, dtypes, bits), same output."""
    a, b = expected.state_dict(), actual.state_dict()
    assert list(a) == list(b)
    for key, tensor in a.items():
        assert bitwise_equal(tensor, b[key]), key
    for (name, m1), (_, m2) in zip(expected.named_modules(), actual.named_modules(), strict=True):
        assert type(m1) is type(m2), name
        if isinstance(m1, AQModule):
            assert (m1.spec, m1.shape) == (m2.spec, m2.shape), name
    assert not actual.training
    if make_input is not None:
        args, kwargs = make_input(expected)
        with torch.no_grad():
            assert torch.equal(expected(*args, **kwargs).sample, actual(*args, **kwargs).sample)


# ---------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def unet2d_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("unet2d") / "model"
    avq.save_quantized(quantize_layers(tiny_unet2d(), UNET2D_LAYERS, UNET2D_ACTIVATIONS), folder)
    return folder


@pytest.fixture(scope="module")
def cond_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the conditional UNet in `unet/`, as in a pipeline."""
    root = tmp_path_factory.mktemp("cond")
    avq.save_quantized(quantize_layers(tiny_cond_unet(), COND_LAYERS, COND_ACTIVATIONS), root / "unet")
    return root


@pytest.fixture
def copy(unet2d_folder: Path, tmp_path: Path) -> Path:
    """A private copy (two separate weights files: copytree does not keep hard links), for damage."""
    return Path(shutil.copytree(unet2d_folder, tmp_path / "copy"))


def rewrite(
    folder: Path, tensors: Callable[[dict], None] | None = None, config: Callable[[dict], None] | None = None
) -> None:
    """Edit a saved folder's tensors and/or config, then re-record both checksums and give the weights
    their diffusers name again, so that the damage reaches the checks behind the checksums."""
    weights, config_path = folder / WEIGHTS_NAME, folder / "config.json"
    data = json.loads(config_path.read_text())
    if tensors is not None:
        state = load_file(weights)
        tensors(state)
        save_file(state, weights)
    if config is not None:
        config(data)
    data["quantization_config"]["checksum"] = {
        WEIGHTS_NAME: f"sha256:{sha256_file(weights)}",
        "config.json": config_digest(data),
    }
    config_path.write_text(json.dumps(data))
    (folder / DIFFUSERS_WEIGHTS_NAME).unlink(missing_ok=True)
    os.link(weights, folder / DIFFUSERS_WEIGHTS_NAME)


# ---------------------------------------------------------------------------------------- registration
def test_diffusers_internals_the_backend_relies_on() -> None:
    """Pins what `avq.storage.diffusers_backend` uses of diffusers (no public plug-in registry exists)."""
    assert isinstance(diffusers_auto.AUTO_QUANTIZER_MAPPING, dict)
    assert isinstance(diffusers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING, dict)
    assert diffusers_auto.AUTO_QUANTIZER_MAPPING["avq"] is backend.AvqDiffusersQuantizer
    assert diffusers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING["avq"] is backend.AvqConfig
    assert registry.is_registered()
    assert issubclass(backend.AvqConfig, QuantizationConfigMixin)
    assert issubclass(backend.AvqDiffusersQuantizer, DiffusersQuantizer)
    assert not inspect.isabstract(backend.AvqDiffusersQuantizer)
    # The hooks `ModelMixin.from_pretrained` calls, with the arguments the backend reads.
    hooks = {
        "validate_environment": None,
        "update_torch_dtype": ["self", "torch_dtype"],
        "maybe_update_loaded_keys": ["self", "loaded_keys", "checkpoint_files"],
        "preprocess_model": None,
        "_process_model_before_weight_loading": None,
        "postprocess_model": None,
        "_process_model_after_weight_loading": None,
    }
    for hook, params in hooks.items():
        assert callable(getattr(DiffusersQuantizer, hook)), hook
        if params is not None:
            assert list(inspect.signature(getattr(DiffusersQuantizer, hook)).parameters) == params, hook
    source = inspect.getsource(diffusers.ModelMixin.from_pretrained)
    for call in (
        "DiffusersAutoQuantizer.merge_quantization_configs",
        "hf_quantizer.maybe_update_loaded_keys(loaded_keys, checkpoint_files)",
        "hf_quantizer.preprocess_model(",
        "hf_quantizer.postprocess_model(model)",
        "quant_method.value",
    ):
        assert call in source, call
    # diffusers' QuantizationMethod is a closed Enum: avq brings its own str Enum with the same behaviour.
    assert issubclass(diffusers.quantizers.quantization_config.QuantizationMethod, Enum)
    method = backend.AvqQuantizationMethod.AVQ
    assert method == "avq" and method.value == "avq" and str(method) == "avq"
    assert method in diffusers_auto.AUTO_QUANTIZER_MAPPING


def test_auto_quantizer_round_trips_the_block(unet2d_folder: Path) -> None:
    block = json.loads((unet2d_folder / "config.json").read_text())["quantization_config"]
    config = diffusers_auto.DiffusersAutoQuantizer.from_dict(block)
    assert type(config) is backend.AvqConfig
    assert config.to_dict() == block and dict(config) == block
    assert json.loads(config.to_json_string()) == block
    assert config == backend.AvqConfig.from_dict(json.loads(json.dumps(block)))
    assert set(config.layers) == set(UNET2D_LAYERS) and set(config.activations) == set(UNET2D_ACTIVATIONS)
    assert "layers=4" in repr(config)
    quantizer = diffusers_auto.DiffusersAutoQuantizer.from_config(config, pre_quantized=True)
    assert type(quantizer) is backend.AvqDiffusersQuantizer
    assert (quantizer.is_serializable, quantizer.is_trainable) == (False, False)
    with pytest.raises(ValueError, match="pre-quantized"):  # avq does not quantize inside from_pretrained
        diffusers_auto.DiffusersAutoQuantizer.from_config(config, pre_quantized=False)


def test_register_is_idempotent_and_lazy() -> None:
    """`import avq` does not import diffusers; importing diffusers afterwards registers avq; register() again
    adds nothing."""
    code = (
        "import sys, avq\n"
        "from avq.storage import diffusers_backend as b, diffusers_registry as r\n"
        "assert 'diffusers' not in sys.modules\n"
        "r.register(); r.register()\n"
        "hooks = [f for f in sys.meta_path if type(f).__name__ == '_RegisterOnImport']\n"
        "assert len(hooks) == 1, hooks\n"
        "from diffusers import UNet2DModel\n"
        "import importlib, diffusers.quantizers.auto as auto\n"
        "assert auto.AUTO_QUANTIZER_MAPPING['avq'] is b.AvqDiffusersQuantizer\n"
        "assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING['avq'] is b.AvqConfig\n"
        "importlib.reload(auto)\n"
        "assert auto.AUTO_QUANTIZER_MAPPING['avq'] is b.AvqDiffusersQuantizer\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
    before = (dict(diffusers_auto.AUTO_QUANTIZER_MAPPING), len(sys.meta_path))
    registry.register()  # diffusers imported here: registers directly
    assert (dict(diffusers_auto.AUTO_QUANTIZER_MAPPING), len(sys.meta_path)) == before


def test_without_accelerate_the_error_says_what_to_do(monkeypatch: pytest.MonkeyPatch, unet2d_folder) -> None:
    block = json.loads((unet2d_folder / "config.json").read_text())["quantization_config"]
    quantizer = backend.AvqDiffusersQuantizer(backend.AvqConfig(**block))
    monkeypatch.setattr(diffusers.utils, "is_accelerate_available", lambda: False)
    with pytest.raises(ImportError, match="needs `accelerate`.*avq.load_quantized"):
        quantizer.validate_environment()


# ---------------------------------------------------------------------------------------- loading
@needs_accelerate
def test_unet2d_from_pretrained_equals_load_quantized(unet2d_folder: Path) -> None:
    reference = avq.load_quantized(unet2d_folder)
    loaded = UNet2DModel.from_pretrained(unet2d_folder)
    assert type(loaded) is UNet2DModel and loaded.is_quantized
    assert isinstance(loaded.hf_quantizer, backend.AvqDiffusersQuantizer)
    for name, spec in UNET2D_LAYERS.items():
        assert isinstance(loaded.get_submodule(name), AQModule) and loaded.get_submodule(name).spec == spec
    assert loaded.get_submodule("down_blocks.1.attentions.0.to_q").codes.dtype == torch.uint16
    for name in UNET2D_ACTIVATIONS:
        assert isinstance(loaded.get_submodule(name).input_quantizer, ActQuantizer)
    assert loaded.dtype == torch.float32  # conv_in's codebooks: the dtype of the layer they replaced
    assert_same_model(reference, loaded, unet2d_input)


@needs_accelerate
def test_conditional_unet_from_pipeline_subfolder(cond_root: Path) -> None:
    reference = avq.load_quantized(cond_root / "unet")
    loaded = UNet2DConditionModel.from_pretrained(cond_root, subfolder="unet")
    assert_same_model(reference, loaded, cond_input)
    assert_same_model(reference, UNet2DConditionModel.from_pretrained(cond_root / "unet"))


@needs_accelerate
def test_torch_dtype_equals_load_quantized_then_to(unet2d_folder: Path) -> None:
    """`torch_dtype=X` casts every floating tensor, like `load_quantized(folder).to(X)`; codes never."""
    reference = avq.load_quantized(unet2d_folder).to(torch.float16)
    loaded = UNet2DModel.from_pretrained(unet2d_folder, torch_dtype=torch.float16)
    assert_same_model(reference, loaded)
    assert loaded.dtype == torch.float16
    assert loaded.get_submodule("conv_in").codes.dtype == torch.uint8
    assert loaded.get_submodule("down_blocks.1.attentions.0.to_q").codes.dtype == torch.uint16


@needs_accelerate
def test_half_saved_model_keeps_its_dtypes(tmp_path: Path) -> None:
    """Without torch_dtype every tensor keeps the dtype it was saved in (fp16 here), as in load_quantized,
    where diffusers alone would give the model fp32."""
    model = quantize_layers(tiny_unet2d(), {"conv_in": QuantSpec(1, 8, 9, "kernel")}, {}).half()
    model.get_submodule("conv_out").float()  # and one layer saved in fp32
    avq.save_quantized(model, tmp_path / "half")
    loaded = UNet2DModel.from_pretrained(tmp_path / "half")
    assert_same_model(avq.load_quantized(tmp_path / "half"), loaded)
    assert loaded.conv_in.codebooks.dtype == loaded.dtype == torch.float16
    assert loaded.conv_out.weight.dtype == torch.float32


@needs_accelerate
def test_pipeline_from_pretrained_runs(tmp_path: Path) -> None:
    folder = tmp_path / "pipe"
    DDPMPipeline(unet=tiny_unet2d(None), scheduler=DDPMScheduler(num_train_timesteps=50)).save_pretrained(
        folder
    )
    shutil.rmtree(folder / "unet")
    avq.save_quantized(quantize_layers(tiny_unet2d(None), UNET2D_LAYERS, UNET2D_ACTIVATIONS), folder / "unet")

    pipe = DiffusionPipeline.from_pretrained(folder)
    assert type(pipe) is DDPMPipeline and pipe.unet.is_quantized
    assert isinstance(pipe.unet.get_submodule("conv_in"), AQModule)
    reference = DDPMPipeline(unet=avq.load_quantized(folder / "unet"), scheduler=pipe.scheduler)
    assert_same_model(reference.unet, pipe.unet)
    images = [
        p(
            batch_size=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
        ).images
        for p in (pipe, reference)
    ]
    assert images[0].shape == (1, 8, 8, 1) and (images[0] == images[1]).all()


@needs_accelerate
def test_save_quantized_of_a_diffusers_loaded_model(unet2d_folder: Path, tmp_path: Path) -> None:
    """The old avq block in the loaded model's config is replaced by the new one."""
    loaded = UNet2DModel.from_pretrained(unet2d_folder)
    avq.save_quantized(loaded, tmp_path / "again")
    assert_same_model(loaded, avq.load_quantized(tmp_path / "again"), unet2d_input)
    assert_same_model(loaded, UNet2DModel.from_pretrained(tmp_path / "again"))
    with pytest.raises(ValueError, match="not serializable"):
        loaded.save_pretrained(tmp_path / "diffusers-save")


# ---------------------------------------------------------------------------------------- weights file names
def test_weights_under_both_names_without_doubling_disk_use(unet2d_folder: Path) -> None:
    assert sorted(os.listdir(unet2d_folder)) == ["config.json", DIFFUSERS_WEIGHTS_NAME, WEIGHTS_NAME]
    assert os.path.samefile(unet2d_folder / WEIGHTS_NAME, unet2d_folder / DIFFUSERS_WEIGHTS_NAME)
    assert (unet2d_folder / WEIGHTS_NAME).stat().st_nlink == 2
    checksum = json.loads((unet2d_folder / "config.json").read_text())["quantization_config"]["checksum"]
    assert checksum[WEIGHTS_NAME] == f"sha256:{sha256_file(unet2d_folder / WEIGHTS_NAME)}"
    assert set(checksum) == {WEIGHTS_NAME, "config.json"}  # one entry covers both names


def test_copy_where_hard_links_fail(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def no_links(*args, **kwargs):
        raise OSError("hard links not supported")

    monkeypatch.setattr(serialization.os, "link", no_links)
    model = quantize_layers(tiny_unet2d(), {"conv_in": QuantSpec(1, 8, 9, "kernel")}, {})
    avq.save_quantized(model, tmp_path / "m")
    monkeypatch.undo()
    a, b = tmp_path / "m" / WEIGHTS_NAME, tmp_path / "m" / DIFFUSERS_WEIGHTS_NAME
    assert not os.path.samefile(a, b) and a.read_bytes() == b.read_bytes()
    assert_same_model(model, avq.load_quantized(tmp_path / "m"))
    avq.save_quantized(model, tmp_path / "m")  # a previous save with both names is replaced as ours


@pytest.mark.parametrize("keep", [WEIGHTS_NAME, DIFFUSERS_WEIGHTS_NAME])
def test_load_quantized_accepts_either_name(copy: Path, keep: str) -> None:
    reference = avq.load_quantized(copy)
    for name in {WEIGHTS_NAME, DIFFUSERS_WEIGHTS_NAME} - {keep}:
        (copy / name).unlink()
    assert_same_model(reference, avq.load_quantized(copy))


@pytest.mark.parametrize("damaged", [WEIGHTS_NAME, DIFFUSERS_WEIGHTS_NAME])
def test_two_names_must_hold_the_same_bytes(copy: Path, damaged: str) -> None:
    path = copy / damaged
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # one bit of one weight, in one of the two (separate) files
    path.write_bytes(bytes(data))
    with pytest.raises(FormatError, match=f"checksum mismatch for .*{damaged}.*tampered or corrupted"):
        avq.load_quantized(copy)
    if damaged == DIFFUSERS_WEIGHTS_NAME and is_accelerate_available():  # the file diffusers reads
        with pytest.raises(FormatError, match=f"from_pretrained \\(avq\\): checksum mismatch .*{damaged}"):
            UNet2DModel.from_pretrained(copy)


# ---------------------------------------------------------------------------------------- config checksum
def flip_key(folder: Path, old: str, new: str) -> None:
    """A bit flip in `config.json`'s text: one key renamed, nothing re-recorded."""
    path = folder / "config.json"
    text = path.read_text()
    assert text.count(f'"{old}"') == 1
    path.write_text(text.replace(f'"{old}"', f'"{new}"'))


def test_config_bit_flip_is_caught_by_load_quantized(copy: Path) -> None:
    flip_key(copy, "mid_block_scale_factor", "mid_block_scahe_factor")  # 'l' ^ 0x04 = 'h'
    with pytest.raises(FormatError, match="checksum mismatch for the model config in .*config.json"):
        avq.load_quantized(copy)


@needs_accelerate
def test_config_bit_flip_is_caught_by_from_pretrained(copy: Path) -> None:
    flip_key(copy, "mid_block_scale_factor", "mid_block_scahe_factor")
    with pytest.raises(
        FormatError, match="from_pretrained \\(avq\\): checksum mismatch for the model config"
    ):
        UNet2DModel.from_pretrained(copy)


def test_config_value_change_is_caught(copy: Path) -> None:
    path = copy / "config.json"
    data = json.loads(path.read_text())
    data["norm_eps"] = 1e-4  # was 1e-5
    path.write_text(json.dumps(data, indent=4))  # formatting alone changes nothing: canonical JSON
    with pytest.raises(FormatError, match="checksum mismatch for the model config"):
        avq.load_quantized(copy)


def test_config_checksum_ignores_formatting(copy: Path) -> None:
    path = copy / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text())))  # one line, other key order
    avq.load_quantized(copy)


def test_resolved_config_shows_the_flip(unet2d_folder: Path) -> None:
    """What the backend checks when diffusers does not name the folder it reads: the model's resolved
    config, less the keys diffusers filled with defaults (`_use_default_values`)."""
    config = json.loads((unet2d_folder / "config.json").read_text())
    recorded = config["quantization_config"]["checksum"]["config.json"]
    model = UNet2DModel.from_config(config)
    assert config_digest(backend.config_from_model(model)) == recorded  # no false alarm
    flipped = dict(config)
    flipped["mid_block_scahe_factor"] = flipped.pop("mid_block_scale_factor")
    model = UNet2DModel.from_config(flipped)
    assert "mid_block_scale_factor" in model.config["_use_default_values"]  # diffusers' default, silently
    assert config_digest(backend.config_from_model(model)) != recorded


def test_folder_without_config_checksum_loads_with_a_warning(copy: Path, caplog) -> None:
    """Folders saved before the config checksum existed."""
    path = copy / "config.json"
    data = json.loads(path.read_text())
    del data["quantization_config"]["checksum"]["config.json"]
    path.write_text(json.dumps(data))
    with caplog.at_level("WARNING", logger="avq"):
        avq.load_quantized(copy)
    assert "model config is not verified" in caplog.text


# ---------------------------------------------------------------------------------------- refused folders
@pytest.mark.parametrize("path", ["load_quantized", "from_pretrained"])
def test_newer_version_is_refused(copy: Path, path: str) -> None:
    rewrite(copy, config=lambda c: c["quantization_config"].update(version=VERSION + 1))
    if path == "from_pretrained" and not is_accelerate_available():
        pytest.skip("needs accelerate")
    load = avq.load_quantized if path == "load_quantized" else UNet2DModel.from_pretrained
    with pytest.raises(
        FormatError, match=f"version {VERSION + 1}: the folder was written by a newer avq version"
    ):
        load(copy)


@needs_accelerate
@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda t: t.pop("conv_out.weight"), "missing tensor.*'conv_out.weight'"),
        (lambda t: t.update({"foo.bar": torch.zeros(2)}), "unexpected tensor.*'foo.bar'"),
        (
            lambda t: t.update({"conv_in.codes": t["conv_in.codes"].to(torch.int32)}),
            "conv_in.*codes'? has dtype torch.int32",
        ),
        (
            lambda t: t.update({"conv_in.codebooks": t["conv_in.codebooks"].float()}),
            "codebooks'? has dtype torch.float32",
        ),
        (lambda t: t.update({"conv_out.weight": t["conv_out.weight"][:, :-1].contiguous()}), "has shape"),
    ],
)
def test_from_pretrained_is_as_strict_as_load_quantized(copy: Path, damage, match: str) -> None:
    rewrite(copy, tensors=damage)
    for load in (avq.load_quantized, UNet2DModel.from_pretrained):
        with pytest.raises(FormatError, match=match):
            load(copy)


def codes_out_of_range(tensors: dict) -> None:
    codes = tensors["time_embedding.linear_1.codes"].clone()  # B = 4: codes must be < 16
    codes[0, 0, 0] = 16
    tensors["time_embedding.linear_1.codes"] = codes


def nan_range(tensors: dict) -> None:
    key = "down_blocks.0.resnets.0.conv1.input_quantizer.hi"
    tensors[key] = torch.full_like(tensors[key], float("nan"))


@needs_accelerate
@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (codes_out_of_range, "time_embedding.linear_1.*holds 16, out of range for 4-bit codes"),
        (nan_range, "down_blocks.0.resnets.0.conv1.*ranges must be finite"),
    ],
)
def test_from_pretrained_validates_codes_and_ranges(copy: Path, damage, match: str) -> None:
    rewrite(copy, tensors=damage)
    for load in (avq.load_quantized, UNet2DModel.from_pretrained):
        with pytest.raises(FormatError, match=match):
            load(copy)
