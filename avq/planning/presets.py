"""Presets and `QuantizeConfig`: what to quantize and how.

Presets (`preset_config`), chosen from `benchmarks/results/layer_solver.json`:

- `w2a16`: AQ `1x8g4` for every Linear and Conv2d, falling back to `1x4g2` where the codebook overhead of
  `1x8g4` is too large (small layers). Why `1x8g4` and not `2x8g8` (both 2 code bits): on the real-size
  synthetic layers `1x8g4` has about the same error at lower total bits (conv 256x256x3x3: 0.0292 at 2.035
  bits vs 0.0298 at 2.118; linear 512x512: 0.0381 at 2.094 vs 0.0373 at 2.281). On the 32-64-channel
  layers of `digits-unet-mini` `2x8g8` has ~10x lower error but costs 9.2 total bits per weight against
  3.8: it wins only by storing almost every group verbatim, which is not 2-bit quantization.
- `w4a16`: AQ `2x8g4` (4 code bits; about even with GPTQ int4 on real-size layers, 1.1x better on the mini
  UNet's convs), falling back to `1x8g2` then `2x4g2` on small layers.
- `w1.5a16`, `w1a16` (below 2 bits, AQUATIC-Diff's frontier): AQ `2x6g8` (1.5 code bits; two codebooks
  of 64, 16 kbit, where `1x12g8`'s 4096 codewords cost 0.5 bits a weight on a 320x2880 conv) falling back
  to `1x6g4`, and `1x8g8` (1 code bit) falling back to `1x4g4`. The order follows codebook overhead; no
  solver comparison of the sub-2-bit specs has been run yet. No uniform
  baseline goes below 2 bits (`--method gptq|rtn` refuse these presets). With a budget (LAQ), their
  candidates are the 1- and 1.5-bit specs beside the 2-bit ones, so a 1.5- or 1-bit budget can be met.
- `w4a8`, `w2a8`, `w1.5a8`, `w1a8`: the same weights plus 8-bit fake quantization of every quantized
  layer's input (`avq.calibration.activations`): asymmetric per-tensor ranges from the FP sampling
  trajectory (the calibration timesteps, MSE-clipped), with separate ranges for the two halves of each UNet
  skip concatenation (`QuantizeConfig.split_shortcuts`). FP-kept layers keep FP inputs. Simulated (fake)
  quantization: the 8-bit inputs are not fed to an integer kernel.
- `--method gptq|rtn`: uniform int2/int4 with the same FP-keep rule, one grid per output channel or, with
  `group_size` (`--group-size 128`), per group of that many inputs (fp16 scale and zero per group, counted
  in total bits: +0.25 bits at g128, +0.5 at g64; the strong uniform baseline at low bits). The layers
  become packed `UniformLinear` / `UniformConv2d` (`avq.core.uniform_modules`): the levels at their bit
  width and the fp16 grids, saved and loaded like the AQ layers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from avq.core.aq import SolverOptions
from avq.core.spec import QuantSpec, UniformSpec

METHODS = ("avq", "gptq", "rtn")
PRESETS = ("w4a16", "w2a16", "w4a8", "w2a8", "w1.5a16", "w1.5a8", "w1a16", "w1a8")

# (pattern on the full dotted layer name, reason). Top-level names only: `proj_out*` does not match the
# `...attentions.0.proj_out` projections inside UNet transformer blocks.
DEFAULT_KEEP_FP: tuple[tuple[str, str], ...] = (
    ("conv_in", "first layer (model input)"),
    ("pos_embed.proj", "first layer (patch embedding)"),
    ("x_embedder", "first layer (patch embedding)"),
    ("conv_out", "last layer (model output)"),
    ("proj_out*", "last layer (model output)"),
)

# The timestep and class/conditioning embeddings and the adaLN modulation layers that carry them into every
# block (UNet `time_embedding` / `time_emb_proj`, SDXL `add_embedding`, DiT/PixArt `timestep_embedder` /
# `adaln_single` / `norm1.linear`, SD3/Flux `time_text_embed` / `norm*.linear`). With a budget, LAQ gives
# these no fewer code bits than the preset (`QuantizeConfig.laq_floor`): their error shifts every step of
# the sampler the same way, so it adds up over the trajectory, where LAQ's probe sees one step (on
# `digits-dit` a W4 plan that cut three `timestep_embedder` layers to 2 bits was predicted 14 % better than
# all-int4 and measured 1.23x worse over 20 steps; TFMQ-DM and MixDQ report the same of these layers).
CONDITIONING_LAYERS: tuple[str, ...] = (
    "time_embedding.*",
    "*time_emb_proj",
    "class_embedding*",
    "add_embedding.*",
    "*timestep_embedder.*",
    "*class_embedder.*",
    "adaln_single.*",
    "time_text_embed.*",
    "*norm1.linear",
    "*norm1_context.linear",
    "norm_out.linear",
)

_W2_SPECS = (QuantSpec(1, 8, 4), QuantSpec(1, 4, 2))
_W4_SPECS = (QuantSpec(2, 8, 4), QuantSpec(1, 8, 2), QuantSpec(2, 4, 2))
# LAQ candidates, the same for every preset (the budget sets the bits): both 2-bit specs and two 4-bit ones,
# 2x8g4 for large layers and 2x4g2 (tiny codebooks) for small ones. The W4 preset's 1x8g2 is left out to
# keep measuring affordable: every candidate is solved on every layer.
LAQ_SPECS = (*_W2_SPECS, QuantSpec(2, 8, 4), QuantSpec(2, 4, 2))
_W15_SPECS = (QuantSpec(2, 6, 8), QuantSpec(1, 6, 4))  # 1.5 code bits
_W1_SPECS = (QuantSpec(1, 8, 8), QuantSpec(1, 4, 4))  # 1 code bit
# Below 2 bits LAQ chooses among the 1-, 1.5- and 2-bit specs (a 4-bit layer would cost too much there).
LAQ_LOW_SPECS = (*_W1_SPECS, *_W15_SPECS, *_W2_SPECS)
WEIGHT_SPECS = {"w4": _W4_SPECS, "w2": _W2_SPECS, "w1.5": _W15_SPECS, "w1": _W1_SPECS}


class PresetError(ValueError):
    """An unknown preset or method."""


@dataclass(frozen=True)
class QuantizeConfig:
    """What to quantize and how.

    `linear_specs` / `conv_specs`: AQ candidates in order of preference (the first one that fits the
    layer and the overhead limit wins; 1x1 convs use `linear_specs`, they are Linear layers in disguise).
    `bits`: the uniform grid of `gptq`/`rtn`; `group_size`: inputs per grid (None: one per output channel).
    `keep_fp`: (name pattern, reason) pairs always kept in FP.
    `max_overhead_bits`: keep a layer in FP if its total bits would exceed code bits + this (None: no limit).
    `bits_budget`: LAQ (avq only): choose per-layer specs or FP under this many total bits per weight over
    all Linear/Conv2d weights (module docstring); None: the first fitting candidate, as above.
    `activation_bits`: 16 (inputs untouched) or 8 (fake-quantized inputs of quantized layers);
    `split_shortcuts`: separate 8-bit ranges for the halves of UNet skip concatenations.
    `sequential`: calibrate top-level block by block on the model as quantized so far (module docstring).
    `laq_measure_rounds`: solver rounds per candidate while LAQ measures sensitivities (None: all; 0: the
    initialisation only). Every candidate of every layer is solved there, so this is most of what LAQ
    costs at scale: on the SD 1.5-shaped UNet's 14 convs with `K >= 11,520` the two candidates'
    initialisations and one probe took 0.62x a full solve (`benchmarks/results/scale_cpu.json`), and the
    initialisation keeps the candidates' order (`benchmarks/results/laq_measure.json`: the same held-out
    quality as the 2-round, every-candidate measure). The chosen specs are then solved in full (with None
    the measured results are reused instead).
    `laq_probe_all`: probe the model output for every candidate of a layer (the whole-model measure) rather
    than for its cheapest one only, the others scaled by their Hessian-weighted layer errors
    (`avq.planning.sensitivity`); one probe per layer is what keeps measuring a 300-layer model within the
    cost of quantizing it (`benchmarks/laq_measure.py` compares the two).
    `laq_probe`: where a probed candidate's effect is measured: `"model"` (default), on the whole model
    for every layer, or `"block"`, on the layer's top-level block with one whole-model probe per block for
    its gain (`avq.planning.block_probe`): fewer whole-model forwards, but the block's gain does not carry
    to all its layers (`benchmarks/results/laq_measure.json`: -1.4 dB held-out SNR on `digits-unet`,
    -0.1 dB on `digits-dit`, against the model probe at the same budget).
    `laq_uniform`: uniform (GPTQ) grids LAQ may choose for a layer besides the AQ specs and FP, e.g.
    `(UniformSpec(4), UniformSpec(4, 128))`, each at its true total bits (on small layers a uniform grid
    can beat AQ, whose codebooks cost many bits per weight there). Default: none.
    `laq_floor`: (name pattern, code bits) pairs: LAQ does not choose an option of fewer code bits for a
    matching layer (FP stays allowed; where several patterns match, the highest floor counts). Every
    candidate is still measured, so one sensitivity table serves every floor. `preset_config` with a
    budget floors the conditioning layers at the preset's code bits (`default_laq_floor`); adding
    `("*", 4)` lets LAQ choose each layer's representation (AQ, a uniform grid or FP) but never fewer
    code bits than 4.
    """

    method: str = "avq"
    linear_specs: tuple[QuantSpec, ...] = _W4_SPECS
    conv_specs: tuple[QuantSpec, ...] = _W4_SPECS
    bits: int = 4
    group_size: int | None = None
    solver: SolverOptions = field(default_factory=SolverOptions)
    keep_fp: tuple[tuple[str, str], ...] = DEFAULT_KEEP_FP
    max_overhead_bits: float | None = 1.0
    activation_bits: int = 16
    preset: str | None = None
    bits_budget: float | None = None
    split_shortcuts: bool = True
    sequential: bool = False
    laq_measure_rounds: int | None = 0
    laq_probe_all: bool = False
    laq_probe: str = "model"
    laq_uniform: tuple[UniformSpec, ...] = ()
    laq_floor: tuple[tuple[str, float], ...] = ()

    @property
    def laq_solver(self) -> SolverOptions:
        """The solver LAQ measures sensitivities with: `laq_measure_rounds` rounds at most (None: all)."""
        if self.laq_measure_rounds is None or self.laq_measure_rounds >= self.solver.max_rounds:
            return self.solver
        return replace(self.solver, max_rounds=self.laq_measure_rounds)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise PresetError(f"unknown method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.activation_bits not in (8, 16):
            raise PresetError(f"activation_bits must be 8 or 16, got {self.activation_bits!r}")
        if self.method == "avq" and not (self.linear_specs and self.conv_specs):
            raise PresetError("QuantizeConfig: avq needs at least one linear and one conv spec")
        if self.sequential and self.bits_budget is not None:
            raise PresetError("sequential calibration and an LAQ bits_budget cannot be combined")
        if self.bits_budget is not None and (self.method != "avq" or not self.bits_budget > 0):
            raise PresetError(f"bits_budget needs method avq and a value > 0, got {self.bits_budget!r}")
        good_size = isinstance(self.group_size, int) and not isinstance(self.group_size, bool)
        if self.group_size is not None and (self.method == "avq" or not (good_size and self.group_size >= 1)):
            raise PresetError(
                f"group_size is for the uniform methods (gptq, rtn) and an int >= 1, got {self.group_size!r} "
                f"with method {self.method}"
            )
        if self.laq_uniform and self.bits_budget is None:
            raise PresetError("laq_uniform are LAQ candidates: they need a bits_budget")
        if not all(isinstance(s, UniformSpec) for s in self.laq_uniform):
            raise PresetError(f"laq_uniform must be UniformSpecs, got {self.laq_uniform!r}")
        if self.laq_floor and self.bits_budget is None:
            raise PresetError("laq_floor constrains LAQ's choice: it needs a bits_budget")
        if not all(
            isinstance(p, str) and isinstance(b, (int, float)) and not isinstance(b, bool) and b > 0
            for p, b in self.laq_floor
        ):
            raise PresetError(f"laq_floor must be (pattern, code bits > 0) pairs, got {self.laq_floor!r}")
        if self.laq_probe not in ("block", "model"):
            raise PresetError(f"laq_probe must be 'block' or 'model', got {self.laq_probe!r}")
        if self.laq_measure_rounds is not None and self.laq_measure_rounds < 0:
            raise PresetError(f"laq_measure_rounds must be >= 0 or None, got {self.laq_measure_rounds!r}")
        if self.max_overhead_bits is not None and not self.max_overhead_bits >= 0:
            raise PresetError(f"max_overhead_bits must be >= 0 or None, got {self.max_overhead_bits!r}")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["linear_specs"] = [s.name for s in self.linear_specs]
        data["conv_specs"] = [s.name for s in self.conv_specs]
        data["keep_fp"] = [list(p) for p in self.keep_fp]
        data["laq_uniform"] = [s.name for s in self.laq_uniform]
        data["laq_floor"] = [list(p) for p in self.laq_floor]
        return data


def preset_code_bits(preset: str) -> float:
    """The code bits per weight a preset names: `w1.5a8` -> 1.5."""
    if preset not in PRESETS:
        raise PresetError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
    return float(preset.partition("a")[0][1:])


def default_laq_floor(preset: str) -> tuple[tuple[str, float], ...]:
    """LAQ's default floor at a preset: the conditioning layers at the preset's code bits."""
    return tuple((pattern, preset_code_bits(preset)) for pattern in CONDITIONING_LAYERS)


def preset_config(preset: str, method: str = "avq", **overrides: Any) -> QuantizeConfig:
    """The documented `QuantizeConfig` of a preset (see the module docstring for why these specs)."""
    if preset not in PRESETS:
        raise PresetError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
    if method not in METHODS:
        raise PresetError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    weights = preset.partition("a")[0]  # "w2", "w1.5", ...
    low = weights in ("w1", "w1.5")
    if low and method != "avq":
        raise PresetError(
            f"preset {preset}: the uniform methods store 2 bits at least; compare with {method} at w2"
        )
    specs = WEIGHT_SPECS[weights]
    if overrides.get("bits_budget") is not None:
        specs = LAQ_LOW_SPECS if low else LAQ_SPECS
        overrides.setdefault("laq_floor", default_laq_floor(preset))
    bits = 2 if weights == "w2" else 4
    overrides.setdefault("activation_bits", 8 if preset.endswith("a8") else 16)
    return QuantizeConfig(
        method=method, linear_specs=specs, conv_specs=specs, bits=bits, preset=preset, **overrides
    )
