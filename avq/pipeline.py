"""Whole-model quantization: calibrate, choose what to quantize, solve layer by layer, checkpoint.

Presets (`preset_config`), chosen from `benchmarks/results/layer_solver.json`:

- `w2a16`: AQ `1x8g4` for every Linear and Conv2d, falling back to `1x4g2` where the codebook overhead of
  `1x8g4` is too large (small layers). Why `1x8g4` and not `2x8g8` (both 2 code bits): on the real-size
  synthetic layers `1x8g4` has about the same error at lower total bits (conv 256x256x3x3: 0.0292 at 2.035
  bits vs 0.0298 at 2.118; linear 512x512: 0.0381 at 2.094 vs 0.0373 at 2.281). On the 32-64-channel
  layers of `digits-unet-mini` `2x8g8` has ~10x lower error but costs 9.2 total bits per weight against
  3.8: it wins only by storing almost every group verbatim, which is not 2-bit quantization.
- `w4a16`: AQ `2x8g4` (4 code bits; about even with GPTQ int4 on real-size layers, 1.1x better on the mini
  UNet's convs), falling back to `1x8g2` then `2x4g2` on small layers.
- `w4a8`, `w2a8`: the same weights plus 8-bit fake quantization of every quantized layer's input
  (`avq.activations`): asymmetric per-tensor ranges from the FP sampling trajectory (the calibration
  timesteps, MSE-clipped), with separate ranges for the two halves of each UNet skip concatenation
  (`QuantizeConfig.split_shortcuts`). FP-kept layers keep FP inputs. Simulated (fake) quantization: the
  8-bit inputs are not fed to an integer kernel.
- `--method gptq|rtn`: uniform per-channel int2/int4 with the same FP-keep rule. There is no uniform-
  quantized module yet, so these are *simulated*: the dense weight is replaced by its dequantized value
  (the report says so per layer, `simulated: true`).

FP-keep rule (each kept layer's reason is in its report row). A layer stays in full precision when:

1. it is the model's first or last layer (`conv_in`, `conv_out`, the patch embedding `pos_embed.proj`,
   the final projections `proj_out*` of DiT/PixArt; `QuantizeConfig.keep_fp`): few weights, but every
   error there reaches the output unfiltered (keeping just `conv_in`/`conv_out` in FP cut a 2-bit GPTQ
   model's output error 3.4x, design.md);
2. it is a grouped conv or has a non-zero padding mode (the quantized modules cannot represent it);
3. no candidate spec fits it: `K` is not divisible by any candidate group size (e.g. `conv_in` of a
   1-channel model, `K = 9`);
4. every candidate that fits costs more than `code_bits + max_overhead_bits` total bits per weight:
   codebooks and scales are stored in fp16, and on a small layer they outweigh the codes (design.md:
   budget by total bits);
5. it saw no input during calibration (a branch the sampler never calls).

LAQ (`QuantizeConfig.bits_budget`, `--bits-budget B`): instead of the first fitting spec, each layer that
passes rules 1-3 and 5 gets every fitting candidate spec (rule 4's overhead limit is dropped: the budget
counts total bits itself) plus FP. With a budget, `preset_config` offers the same candidates at every
preset, `LAQ_SPECS` (2-bit `1x8g4`, `1x4g2`; 4-bit `2x8g4`, `2x4g2`): the budget, not the preset, sets
the weight bits, so a W2 budget a little above 2 bits can buy 4 bits for the few layers that matter;
`avq.budget` measures each option's effect on the model output and an integer program picks one per layer
so that the total bits per weight over *all* Linear/Conv2d weights (FP-kept ones at 16, as
`QuantizeReport.summary()["total_bits_all"]`) stay within `B`. The choice and the sensitivity table are
in `QuantizeReport.budget`. Candidates are measured with a short solve (`laq_measure_rounds`), the chosen
specs then solved in full.

Sequential calibration (`QuantizeConfig.sequential`, `--sequential`): instead of collecting every
Hessian from the FP model up front, the sampler is re-run once per top-level block (`down_blocks.i`,
`mid_block`, `up_blocks.i`, `transformer_blocks.i`, ...; `avq.calibration.block_of`) on the model as
quantized so far (A8 quantizers included), so a block's layers are fitted to the inputs they will see
after the blocks before them are quantized. Costs one sampler run per block.

Resume: with `checkpoint_dir`, each finished layer is written atomically (`layers/<name>.safetensors` +
`manifest.json`, temporary file then rename), together with the calibration Hessians, and a fingerprint of
the model (class, config, weights), the `QuantizeConfig` and the calibration settings; `resume=True`
applies the finished layers and continues with the rest, and a checkpoint of another model or config is
refused with `CheckpointError`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from .activations import (
    ActQuantizer,
    RangeObserver,
    attach_input_quantizer,
    channel_dim_of,
    in_channels_of,
    shortcut_splits,
)
from .aq import SolverOptions, quantize_weight
from .baselines import UniformQuantizedWeight, quantize_weight_gptq, quantize_weight_rtn
from .calibration import CalibrationConfig, block_of, calibrate, group_by_block, quantizable_layers
from .fileio import write_json_atomic
from .modules import AQModule, replace_module
from .qweight import QuantizedWeight
from .spec import QuantSpec

METHODS = ("avq", "gptq", "rtn")
PRESETS = ("w4a16", "w2a16", "w4a8", "w2a8")
FP16_BITS = 16

# (pattern on the full dotted layer name, reason). Top-level names only: `proj_out*` does not match the
# `...attentions.0.proj_out` projections inside UNet transformer blocks.
DEFAULT_KEEP_FP: tuple[tuple[str, str], ...] = (
    ("conv_in", "first layer (model input)"),
    ("pos_embed.proj", "first layer (patch embedding)"),
    ("conv_out", "last layer (model output)"),
    ("proj_out*", "last layer (model output)"),
)

_W2_SPECS = (QuantSpec(1, 8, 4), QuantSpec(1, 4, 2))
_W4_SPECS = (QuantSpec(2, 8, 4), QuantSpec(1, 8, 2), QuantSpec(2, 4, 2))
# LAQ candidates, the same for every preset (the budget sets the bits): both 2-bit specs and two 4-bit ones,
# 2x8g4 for large layers and 2x4g2 (tiny codebooks) for small ones. The W4 preset's 1x8g2 is left out to
# keep measuring affordable: every candidate is solved on every layer.
LAQ_SPECS = (*_W2_SPECS, QuantSpec(2, 8, 4), QuantSpec(2, 4, 2))


class PresetError(ValueError):
    """An unknown preset or method."""


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be used: another model/config, or an unfinished run not resumed."""


# ============================================================================ config
@dataclass(frozen=True)
class QuantizeConfig:
    """What to quantize and how.

    `linear_specs` / `conv_specs`: AQ candidates in order of preference (the first one that fits the
    layer and the overhead limit wins; 1x1 convs use `linear_specs`, they are Linear layers in disguise).
    `bits`: the uniform grid of `gptq`/`rtn`. `keep_fp`: (name pattern, reason) pairs always kept in FP.
    `max_overhead_bits`: keep a layer in FP if its total bits would exceed code bits + this (None: no limit).
    `bits_budget`: LAQ (avq only): choose per-layer specs or FP under this many total bits per weight over
    all Linear/Conv2d weights (module docstring); None: the first fitting candidate, as above.
    `activation_bits`: 16 (inputs untouched) or 8 (fake-quantized inputs of quantized layers);
    `split_shortcuts`: separate 8-bit ranges for the halves of UNet skip concatenations.
    `sequential`: calibrate top-level block by block on the model as quantized so far (module docstring).
    `laq_measure_rounds`: solver rounds per candidate while LAQ measures sensitivities (None: all). Every
    candidate of every layer is solved there; 2 rounds took a quarter to 40 % of a full solve with errors
    3-12 % higher on a large digits-unet conv (`up_blocks.0.resnets.1.conv1`, 1x8g4 / 2x8g4 / 2x4g2), so the
    chosen specs are then solved in full (with None the measured results are reused instead).
    """

    method: str = "avq"
    linear_specs: tuple[QuantSpec, ...] = _W4_SPECS
    conv_specs: tuple[QuantSpec, ...] = _W4_SPECS
    bits: int = 4
    solver: SolverOptions = field(default_factory=SolverOptions)
    keep_fp: tuple[tuple[str, str], ...] = DEFAULT_KEEP_FP
    max_overhead_bits: float | None = 1.0
    activation_bits: int = 16
    preset: str | None = None
    bits_budget: float | None = None
    split_shortcuts: bool = True
    sequential: bool = False
    laq_measure_rounds: int | None = 2

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
        if self.laq_measure_rounds is not None and self.laq_measure_rounds < 0:
            raise PresetError(f"laq_measure_rounds must be >= 0 or None, got {self.laq_measure_rounds!r}")
        if self.max_overhead_bits is not None and not self.max_overhead_bits >= 0:
            raise PresetError(f"max_overhead_bits must be >= 0 or None, got {self.max_overhead_bits!r}")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["linear_specs"] = [s.name for s in self.linear_specs]
        data["conv_specs"] = [s.name for s in self.conv_specs]
        data["keep_fp"] = [list(p) for p in self.keep_fp]
        return data


def preset_config(preset: str, method: str = "avq", **overrides: Any) -> QuantizeConfig:
    """The documented `QuantizeConfig` of a preset (see the module docstring for why these specs)."""
    if preset not in PRESETS:
        raise PresetError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
    if method not in METHODS:
        raise PresetError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    specs = _W2_SPECS if preset.startswith("w2") else _W4_SPECS
    if overrides.get("bits_budget") is not None:
        specs = LAQ_SPECS
    bits = 2 if preset.startswith("w2") else 4
    overrides.setdefault("activation_bits", 8 if preset.endswith("a8") else 16)
    return QuantizeConfig(
        method=method, linear_specs=specs, conv_specs=specs, bits=bits, preset=preset, **overrides
    )


# ============================================================================ planning
@dataclass(frozen=True)
class LayerPlan:
    name: str
    kind: str  # "linear" | "conv2d"
    shape: tuple[int, ...]
    spec: QuantSpec | None = None  # avq
    bits: int | None = None  # gptq / rtn
    reason: str | None = None  # set when kept in FP

    @property
    def quantized(self) -> bool:
        return self.reason is None


def aq_total_bits(shape: tuple[int, ...], spec: QuantSpec) -> float:
    """Total bits per weight of `spec` on a weight of `shape`, as `QuantizedWeight.total_bits` counts it."""
    out, K = shape[0], math.prod(shape[1:])
    codes = out * (K // spec.group_size) * spec.num_codebooks * spec.nbits
    stored = codes + (spec.num_codebooks * spec.codebook_size * spec.group_size + out) * FP16_BITS
    return stored / (out * K)


def uniform_total_bits(shape: tuple[int, ...], bits: int) -> float:
    out, K = shape[0], math.prod(shape[1:])
    return (out * K * bits + 2 * out * FP16_BITS) / (out * K)


def plan_layer(name: str, layer: nn.Module, config: QuantizeConfig) -> LayerPlan:
    """Apply the FP-keep rule to one layer and pick its spec (or bits)."""
    kind = "conv2d" if isinstance(layer, nn.Conv2d) else "linear"
    shape = tuple(layer.weight.shape)
    kept = lambda reason: LayerPlan(name, kind, shape, reason=reason)  # noqa: E731
    for pattern, reason in config.keep_fp:
        if fnmatch.fnmatchcase(name, pattern):
            return kept(reason)
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            return kept(f"grouped conv (groups={layer.groups})")
        if layer.padding_mode != "zeros":
            return kept(f"padding_mode={layer.padding_mode!r}")
    limit = math.inf if config.max_overhead_bits is None else config.max_overhead_bits
    if config.method != "avq":
        total = uniform_total_bits(shape, config.bits)
        if total > config.bits + limit:
            return kept(
                f"overhead: int{config.bits} would cost {total:.2f} total bits (> {config.bits} + {limit})"
            )
        return LayerPlan(name, kind, shape, bits=config.bits)
    candidates, fitting = _fitting_specs(kind, shape, config)
    K = math.prod(shape[1:])
    if not fitting:
        sizes = ", ".join(str(s.group_size) for s in candidates)
        return kept(f"K={K} not divisible by any candidate group size ({sizes})")
    best = None
    for spec in fitting:
        total = aq_total_bits(shape, spec)
        if total <= spec.code_bits + limit:
            return LayerPlan(name, kind, shape, spec=spec)
        if best is None or total - spec.code_bits < best[1] - best[0].code_bits:
            best = (spec, total)
    spec, total = best
    return kept(
        f"codebook overhead: {spec.name} would cost {total:.2f} total bits for {spec.code_bits:g} code bits "
        f"(limit +{limit:g})"
    )


def _fitting_specs(
    kind: str, shape: tuple[int, ...], config: QuantizeConfig
) -> tuple[tuple[QuantSpec, ...], list[QuantSpec]]:
    """(the config's candidates for this layer kind, those whose group size fits the layer)."""
    K = math.prod(shape[1:])
    is_1x1 = kind == "linear" or shape[2] * shape[3] == 1
    candidates = config.linear_specs if is_1x1 else config.conv_specs
    fitting = [
        s
        for s in candidates
        if K % s.group_size == 0 and (s.conv_grouping == "k" or s.group_size == K // shape[1])
    ]
    return candidates, fitting


def plan_model(model: nn.Module, config: QuantizeConfig) -> list[LayerPlan]:
    """The plan of every Linear/Conv2d of `model`, in module order."""
    plans = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and name:
            plans.append(plan_layer(name, module, config))
    return plans


# ============================================================================ report
@dataclass
class QuantizeReport:
    """Per-layer rows plus notes. Rows: name, kind, shape, status ("quantized" | "kept_fp"), spec,
    code_bits, total_bits, relative_error (H-weighted, against the calibration Hessian), seconds,
    n_rows (calibration rows), simulated (gptq/rtn: dense weight replaced by its dequantized value),
    reason (kept_fp only)."""

    method: str = ""
    preset: str | None = None
    rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    budget: dict | None = None  # LAQ: `BudgetChoice.to_dict()` + "sensitivity" table; None without

    def summary(self) -> dict:
        """Weight-weighted code/total bits over quantized layers and over all layers (FP counted as 16)."""
        q = [r for r in self.rows if r["status"] == "quantized"]
        n = lambda r: math.prod(r["shape"])  # noqa: E731
        nq, nall = sum(n(r) for r in q), sum(n(r) for r in self.rows)
        return {
            "layers": len(self.rows),
            "quantized": len(q),
            "kept_fp": len(self.rows) - len(q),
            "code_bits": sum(n(r) * r["code_bits"] for r in q) / nq if nq else None,
            "total_bits_quantized": sum(n(r) * r["total_bits"] for r in q) / nq if nq else None,
            "total_bits_all": (
                sum(n(r) * (r["total_bits"] if r["status"] == "quantized" else FP16_BITS) for r in self.rows)
                / nall
                if nall
                else None
            ),
        }

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "preset": self.preset,
            "summary": self.summary(),
            "notes": self.notes,
            "rows": self.rows,
            **({"budget": self.budget} if self.budget is not None else {}),
        }

    def table(self) -> str:
        """A plain-text table, one line per layer."""
        header = (
            f"{'layer':<48} {'kind':<6} {'shape':<14} {'spec':<7} {'code':>5} {'total':>6} "
            f"{'rel.err':>9} {'s':>6}"
        )
        lines = [header, "-" * len(header)]
        for r in self.rows:
            shape = "x".join(map(str, r["shape"]))
            kind = "conv" if r["kind"] == "conv2d" else "linear"
            if r["status"] == "quantized":
                lines.append(
                    f"{r['name']:<48} {kind:<6} {shape:<14} {r['spec']:<7} {r['code_bits']:>5.3g} "
                    f"{r['total_bits']:>6.3f} {r['relative_error']:>9.3g} {r['seconds']:>6.2f}"
                )
            else:
                lines.append(f"{r['name']:<48} {kind:<6} {shape:<14} FP      ({r['reason']})")
        s = self.summary()
        if s["quantized"]:
            lines.append(
                f"{s['quantized']} of {s['layers']} layers quantized: {s['code_bits']:.3g} code bits, "
                f"{s['total_bits_quantized']:.3f} total bits per quantized weight, "
                f"{s['total_bits_all']:.3f} over all Linear/Conv2d weights (FP at 16)"
            )
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)


# ============================================================================ checkpoint
def _tensor_digest(digest, tensor: torch.Tensor) -> None:
    t = tensor.detach().cpu().contiguous().reshape(-1)
    digest.update(f"{t.dtype}{list(tensor.shape)}".encode())
    digest.update(t.view(torch.uint8).numpy().tobytes())


def fingerprint(model: nn.Module, config: QuantizeConfig, calibration: Any) -> str:
    """sha256 over the model class, config and weights, the QuantizeConfig and the calibration input."""
    digest = hashlib.sha256()
    model_config = dict(getattr(model, "config", {}) or {})
    model_config = {k: v for k, v in model_config.items() if k not in ("_diffusers_version", "_name_or_path")}
    digest.update(type(model).__name__.encode())
    digest.update(json.dumps(model_config, sort_keys=True, default=str).encode())
    for key, tensor in model.state_dict().items():
        digest.update(key.encode())
        _tensor_digest(digest, tensor)
    digest.update(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    if isinstance(calibration, CalibrationConfig):
        digest.update(json.dumps(calibration.to_dict(), sort_keys=True).encode())
    else:
        for name in sorted(calibration):
            value = calibration[name]
            H = value[0] if isinstance(value, tuple) else value
            digest.update(name.encode())
            _tensor_digest(digest, H)
    return digest.hexdigest()


def _atomic_save_file(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


class _Checkpoint:
    """`manifest.json` ({fingerprint, n_rows, rows, complete}), `hessians.safetensors`,
    `layers/<name>.safetensors`; every file written to a temporary name, then renamed."""

    def __init__(self, folder: Path, fp: str, resume: bool):
        self.folder = folder
        self.manifest_path = folder / "manifest.json"
        if self.manifest_path.exists():
            manifest = json.loads(self.manifest_path.read_text())
            if not resume:
                raise CheckpointError(
                    f"{folder} holds an unfinished run; resume it (resume=True / --resume) "
                    "or delete the folder"
                )
            if manifest.get("fingerprint") != fp:
                raise CheckpointError(
                    f"{folder} is a checkpoint of another model or configuration (fingerprint mismatch); "
                    "delete it or use the original model, preset, method and calibration settings"
                )
            self.manifest = manifest
        else:
            if folder.exists() and any(folder.iterdir()):
                raise CheckpointError(f"{folder} exists and is not an avq checkpoint; choose another folder")
            (folder / "layers").mkdir(parents=True, exist_ok=True)
            self.manifest = {"fingerprint": fp, "n_rows": {}, "rows": {}, "complete": False}
            write_json_atomic(self.manifest_path, self.manifest)

    @property
    def done(self) -> dict[str, dict]:
        return self.manifest["rows"]

    def load_hessians(self, names: list[str]) -> dict[str, tuple[torch.Tensor, int]] | None:
        path = self.folder / "hessians.safetensors"
        if not path.exists():
            return None
        stored = load_file(str(path))
        if not set(names) <= set(stored):
            return None
        return {n: (stored[n], int(self.manifest["n_rows"][n])) for n in names}

    def save_statistics(
        self, hessians: dict[str, tuple[torch.Tensor, int]], quantizers: dict[str, ActQuantizer]
    ) -> None:
        """The latest calibration's Hessians (replacing earlier ones) and all activation ranges so far."""
        if quantizers:  # before the manifest names them
            tensors = {f"{n}.{k}": t for n, q in quantizers.items() for k, t in q.state_dict().items()}
            _atomic_save_file(tensors, self.folder / "activations.safetensors")
        _atomic_save_file({n: h for n, (h, _) in hessians.items()}, self.folder / "hessians.safetensors")
        self.manifest["n_rows"] = {n: c for n, (_, c) in hessians.items()}
        self.manifest["activations"] = {n: q.to_entry() for n, q in quantizers.items()}
        write_json_atomic(self.manifest_path, self.manifest)

    def load_quantizers(self) -> dict[str, ActQuantizer]:
        entries = self.manifest.get("activations") or {}
        if not entries:
            return {}
        stored = load_file(str(self.folder / "activations.safetensors"))
        quantizers = {}
        for name, entry in entries.items():
            quantizer = ActQuantizer.from_entry(entry)
            quantizer.load_state_dict({k: stored[f"{name}.{k}"] for k in ("lo", "hi")})
            quantizers[name] = quantizer
        return quantizers

    def _layer_path(self, name: str) -> Path:
        return self.folder / "layers" / f"{name}.safetensors"

    def save_layer(self, name: str, row: dict, tensors: dict[str, torch.Tensor]) -> None:
        _atomic_save_file(tensors, self._layer_path(name))  # first the tensors, then the manifest entry
        self.manifest["rows"][name] = row
        write_json_atomic(self.manifest_path, self.manifest)

    def load_layer(self, name: str) -> dict[str, torch.Tensor]:
        return load_file(str(self._layer_path(name)))

    def finish(self) -> None:
        self.manifest["complete"] = True
        write_json_atomic(self.manifest_path, self.manifest)


# ============================================================================ quantize
def _stored_tensors(result: QuantizedWeight | UniformQuantizedWeight) -> dict[str, torch.Tensor]:
    return {k: getattr(result, k) for k in result._tensors}


def _rebuild(plan: LayerPlan, tensors: dict[str, torch.Tensor]) -> QuantizedWeight | UniformQuantizedWeight:
    if plan.spec is not None:
        return QuantizedWeight(spec=plan.spec, shape=plan.shape, **tensors)
    return UniformQuantizedWeight(bits=plan.bits, shape=plan.shape, **tensors)


def _apply(model: nn.Module, plan: LayerPlan, result: QuantizedWeight | UniformQuantizedWeight) -> None:
    layer = model.get_submodule(plan.name)
    if isinstance(result, QuantizedWeight):
        replace_module(model, plan.name, AQModule.from_layer(layer, result))
    else:  # simulated: no uniform-quantized module yet
        with torch.no_grad():
            layer.weight.copy_(result.dequantize(layer.weight.dtype).to(layer.weight.device))


def _solve(model: nn.Module, plan: LayerPlan, hessian: torch.Tensor, config: QuantizeConfig):
    weight = model.get_submodule(plan.name).weight.detach()
    if config.method == "avq":
        return quantize_weight(weight, hessian, plan.spec, name=plan.name, **asdict(config.solver))
    if config.method == "gptq":
        return quantize_weight_gptq(weight, hessian, plan.bits, name=plan.name)
    return quantize_weight_rtn(weight, plan.bits, hessian, name=plan.name)


def quantize(
    model: nn.Module,
    config: QuantizeConfig,
    calibration: CalibrationConfig | Mapping[str, torch.Tensor | tuple[torch.Tensor, int]],
    *,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    conditioning: torch.Tensor | None = None,
    on_layer: Callable[[dict], None] | None = None,
    report: QuantizeReport | None = None,
    sensitivity: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Quantize `model` in place and return it (design.md contract).

    Pass an empty `QuantizeReport()` as `report` to receive the per-layer table and notes.

    `calibration`: a `CalibrationConfig` (run the FP sampler, `avq.calibration.calibrate`) or ready
    Hessians `{name: H [K, K]}` (or `(H, n_rows)`). Hessians are collected from the FP model before any
    layer is replaced, or with `config.sequential` block by block from the model quantized so far.
    `on_layer(row)` is called after each layer is finished (and checkpointed). See the module docstring
    for the FP-keep rule and resume.
    `sensitivity` (LAQ only): a table measured by an earlier run of the same model, calibration and
    candidates (`report.budget["sensitivity"]`, also in `avq quantize --json`): the choice under this
    budget is made from it without measuring again (budget sweeps), and only the chosen specs are solved.
    """
    from tqdm.auto import tqdm

    # LAQ: rule 4 (overhead) is left to the budget, so those layers are candidates too.
    plans = plan_model(
        model, config if config.bits_budget is None else replace(config, max_overhead_bits=None)
    )
    quantizable = set(quantizable_layers(model))
    plans = [
        p if p.name in quantizable or not p.quantized else replace(p, reason="not a quantizable layer")
        for p in plans
    ]
    todo = [p for p in plans if p.quantized]
    if config.bits_budget is not None:  # fail before calibrating when even the cheapest choice is over
        from .budget import FP, choose_specs

        cheapest = {
            p.name: {
                "min": (
                    0.0,
                    min(
                        [aq_total_bits(p.shape, s) for s in _fitting_specs(p.kind, p.shape, config)[1]]
                        + [FP16_BITS]
                    ),
                )
            }
            if p.quantized
            else {FP: (0.0, float(FP16_BITS))}
            for p in plans
        }
        choose_specs(cheapest, {p.name: math.prod(p.shape) for p in plans}, config.bits_budget)
    ckpt = None
    if checkpoint_dir is not None:
        ckpt = _Checkpoint(Path(checkpoint_dir), fingerprint(model, config, calibration), resume)
    done = ckpt.done if ckpt else {}

    # Statistics: from the FP model before anything is replaced, or (sequential) per block, below.
    pending = [p.name for p in todo if p.name not in done]
    a8 = config.activation_bits < 16
    if (a8 or config.sequential) and not isinstance(calibration, CalibrationConfig):
        raise ValueError(
            "quantize: 8-bit activations and sequential calibration need a CalibrationConfig (they run the "
            "sampler), not ready Hessians"
        )
    quantizers: dict[str, ActQuantizer] = ckpt.load_quantizers() if ckpt and a8 else {}
    hessians: dict[str, tuple[torch.Tensor, int]] = {}

    def statistics(names: list[str]) -> dict[str, tuple[torch.Tensor, int]]:
        """Hessians (and, for A8, ranges into `quantizers`) of `names`: from the checkpoint or calibrated."""
        stored = ckpt.load_hessians(names) if ckpt and names else None
        if stored is not None and (not a8 or set(names) <= set(quantizers)):
            return stored
        observers = _range_observers(model, names, config) if a8 else {}
        result = calibrate(
            model, names, calibration, conditioning=conditioning, progress=progress, observers=observers
        )
        quantizers.update({n: o.quantizer(config.activation_bits) for n, o in observers.items() if o.count})
        if ckpt:
            ckpt.save_statistics(result, quantizers)
        return result

    if isinstance(calibration, CalibrationConfig):
        if not config.sequential and pending:
            hessians = statistics(pending)
    else:
        hessians = {}
        for name in pending:
            if name not in calibration:
                raise ValueError(f"quantize: no Hessian given for layer {name!r}")
            value = calibration[name]
            hessians[name] = value if isinstance(value, tuple) else (value, -1)

    report = QuantizeReport() if report is None else report
    report.method, report.preset = config.method, config.preset
    solved: dict[str, QuantizedWeight] = {}
    if config.bits_budget is not None:
        plans, solved = _laq_plans(
            model, plans, hessians, config, calibration, conditioning, ckpt, progress, report, sensitivity
        )
        todo = [p for p in plans if p.quantized]
    if config.method != "avq":
        report.notes.append(
            f"{config.method} results are simulated: each dense weight is replaced by its dequantized "
            f"int{config.bits} value (there is no uniform-quantized module yet), so the model is not smaller"
        )
    rows: dict[str, dict] = {}
    blocks = group_by_block([p.name for p in todo])
    bar = tqdm(todo, desc=f"quantize ({config.method})", unit="layer", disable=not progress)
    for plan in bar:
        bar.set_postfix_str(plan.name[-40:])
        if plan.name in done:
            _apply(model, plan, _rebuild(plan, ckpt.load_layer(plan.name)))
            if a8 and done[plan.name]["status"] == "quantized":
                attach_input_quantizer(model.get_submodule(plan.name), quantizers[plan.name])
            rows[plan.name] = done[plan.name]
            continue
        if plan.name not in hessians:  # sequential: the first unfinished layer of its block
            hessians = statistics([n for n in blocks[block_of(plan.name)] if n not in done])
        hessian, n_rows = hessians[plan.name]
        if n_rows == 0:
            rows[plan.name] = _kept_row(plan, "no calibration input (never called while sampling)")
            continue
        start = time.perf_counter()
        result = solved.get(plan.name) or _solve(model, plan, hessian, config)
        _apply(model, plan, result)
        if a8:  # now, so that a sequential calibration of later blocks sees 8-bit inputs here
            attach_input_quantizer(model.get_submodule(plan.name), quantizers[plan.name])
        row = {
            "name": plan.name,
            "kind": plan.kind,
            "shape": list(plan.shape),
            "status": "quantized",
            "spec": plan.spec.name if plan.spec else f"int{plan.bits}",
            "code_bits": result.code_bits,
            "total_bits": result.total_bits,
            "relative_error": float(result.info["relative_error"]),
            "seconds": round(time.perf_counter() - start, 3),
            "n_rows": int(n_rows),
            "simulated": config.method != "avq",
        }
        if report.budget is not None:
            row["sensitivity"] = (
                report.budget["sensitivity"].get(plan.name, {}).get(row["spec"], {}).get("error")
            )
        rows[plan.name] = row
        if ckpt:
            ckpt.save_layer(plan.name, row, _stored_tensors(result))
        if on_layer is not None:
            on_layer(row)
    bar.close()
    if config.sequential:
        report.notes.append(
            f"sequential: calibrated block by block ({len(blocks)} blocks) on the model quantized so far"
        )
    if a8:
        quantized = [name for name, row in rows.items() if row["status"] == "quantized"]
        for name in quantized:
            rows[name]["activation_splits"] = list(quantizers[name].splits)
        n_split = sum(1 for name in quantized if quantizers[name].splits)
        report.notes.append(
            f"A{config.activation_bits}: inputs of {len(quantized)} quantized layers fake-quantized "
            f"({n_split} with split ranges at skip concatenations); FP-kept layers keep FP inputs"
        )
    if ckpt:
        ckpt.finish()
    report.rows = [rows.get(p.name) or _kept_row(p, p.reason) for p in plans]
    return model


def _range_observers(model: nn.Module, names: list[str], config: QuantizeConfig) -> dict[str, RangeObserver]:
    """One activation-range observer per layer; split at the skip concatenation where there is one."""
    splits = shortcut_splits(model) if config.split_shortcuts else {}
    observers = {}
    for i, name in enumerate(names):
        layer = model.get_submodule(name)
        split = [splits[name]] if name in splits else []
        observers[name] = RangeObserver(in_channels_of(layer), split, channel_dim_of(layer), seed=i)
    return observers


def _laq_plans(
    model: nn.Module,
    plans: list[LayerPlan],
    hessians: dict[str, tuple[torch.Tensor, int]],
    config: QuantizeConfig,
    calibration: Any,
    conditioning: torch.Tensor | None,
    ckpt: _Checkpoint | None,
    progress: bool,
    report: QuantizeReport,
    sensitivity: Mapping[str, Any] | None = None,
) -> tuple[list[LayerPlan], dict[str, QuantizedWeight]]:
    """Replace each quantizable plan's spec by the LAQ choice (`avq.budget`); return the new plans and the
    already solved weights of the chosen specs. A resumed run reuses the choice stored in the checkpoint
    (the finished layers were solved with it)."""
    from .budget import FP, SensitivityTable, choose_specs

    candidates: dict[str, list] = {}
    forced: dict[str, str] = {}  # layers kept in FP whatever the budget: they count 16 bits in it
    for p in plans:
        if not p.quantized or hessians.get(p.name, (None, 1))[1] == 0:
            forced[p.name] = p.reason or "no calibration input (never called while sampling)"
            candidates[p.name] = [FP]
        else:
            candidates[p.name] = [*_fitting_specs(p.kind, p.shape, config)[1], FP]
    solved: dict[str, QuantizedWeight] = {}
    if ckpt is not None and "laq" in ckpt.manifest:
        report.budget = ckpt.manifest["laq"]
    else:
        sizes = {p.name: math.prod(p.shape) for p in plans}
        if sensitivity is not None:
            table = SensitivityTable.from_dict(sensitivity, candidates, sizes)
            report.notes.append("LAQ: sensitivity table given (reused, not measured)")
        else:
            table = _measure_laq(model, candidates, hessians, config, calibration, conditioning, progress)
            for name in [n for n, opts in candidates.items() if opts == [FP]]:  # forced FP: fixed cost only
                table.errors[name], table.bits[name] = {FP: 0.0}, {FP: float(FP16_BITS)}
                table.sizes[name] = sizes[name]
        choice = choose_specs(table, table.sizes, config.bits_budget, verbose=progress)
        report.budget = {**choice.to_dict(), "sensitivity": table.to_dict()}
        solved = {  # only kept when measured with the full solver; otherwise solved again below
            name: table.results[name][key]
            for name, key in choice.choice.items()
            if key in table.results.get(name, {})
        }
        if ckpt is not None:
            ckpt.manifest["laq"] = report.budget
            write_json_atomic(ckpt.manifest_path, ckpt.manifest)
    choice = report.budget["choice"]
    specs = {s.name: s for opts in candidates.values() for s in opts if isinstance(s, QuantSpec)}
    new_plans = []
    for p in plans:
        key = choice.get(p.name, FP)
        if p.name in forced:
            new_plans.append(replace(p, spec=None, reason=forced[p.name]))
        elif key == FP:
            new_plans.append(replace(p, spec=None, reason="LAQ: FP chosen under the bit budget"))
        else:
            new_plans.append(replace(p, spec=specs[key], reason=None))
    report.notes.append(
        f"LAQ: budget {report.budget['budget_total_bits']:g} total bits per weight over all Linear/Conv2d "
        f"weights, chosen {report.budget['total_bits']:.3f} (predicted output error "
        f"{report.budget['predicted_error']:.3g})"
    )
    return new_plans, solved


def _measure_laq(
    model: nn.Module,
    candidates: dict[str, list],
    hessians: dict[str, tuple[torch.Tensor, int]],
    config: QuantizeConfig,
    calibration: Any,
    conditioning: torch.Tensor | None,
    progress: bool,
):
    """The LAQ sensitivity table of the layers with a choice, on a small probe of FP sampler inputs."""
    from .budget import FP, make_probe, measure_sensitivity

    probe_config = None
    if isinstance(calibration, CalibrationConfig):
        probe_config = replace(
            calibration,
            num_samples=min(8, calibration.num_samples),
            batch_size=min(8, calibration.num_samples),
            num_timesteps_kept=min(5, calibration.num_steps),
            seed=calibration.seed + 1,  # not the calibration trajectories
            layers_per_pass=None,
        )
    probe = make_probe(model, probe_config, conditioning=conditioning)
    measured = [n for n, opts in candidates.items() if opts != [FP]]
    return measure_sensitivity(
        model,
        measured,
        candidates,
        probe,
        hessians,
        solver=config.laq_solver,
        progress=progress,
        keep_results=config.laq_solver == config.solver,  # short solves are redone: don't hold all
    )


def _kept_row(plan: LayerPlan, reason: str) -> dict:
    return {
        "name": plan.name,
        "kind": plan.kind,
        "shape": list(plan.shape),
        "status": "kept_fp",
        "spec": None,
        "code_bits": None,
        "total_bits": None,
        "relative_error": None,
        "seconds": 0.0,
        "reason": reason,
    }
