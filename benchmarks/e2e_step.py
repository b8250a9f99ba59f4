"""End-to-end benchmark: one denoising step (a UNet forward) of the FP model vs its W2 quantized twin.

    python benchmarks/e2e_step.py                      # full run -> benchmarks/results/e2e_step_<device>.json
    python benchmarks/e2e_step.py --quick              # digits-unet-mini only, few repeats (< 60 s)
    python benchmarks/e2e_step.py --models ldm4-imagenet --ldm-channels 128   # a smaller LDM-4 shape

`<device>` is `cpu` or `cuda` (fp32 on CPU, fp16 on CUDA); runs unchanged on either (`--device` to force).

Models: `digits-unet-mini` (shipped), `digits-unet` (if `benchmarks/avq_bench/assets/digits-unet`
exists, else a row with
`"skipped"`), and `ldm4-imagenet`: a randomly initialised diffusers `UNet2DModel` shaped like LDM-4
ImageNet (latent 64x64x3, model_channels 192, mult 1-2-3-5, 2 res blocks per level, self-attention at the
32/16/8 resolutions with 32-channel heads, 1001 classes). Its UNet2DModel attention blocks are plain
self-attention (no feed-forward / cross-attention of LDM's SpatialTransformer), so it has ~264 M parameters,
not LDM-4's ~400 M; each row carries the measured count. `sd1.5`: a randomly initialised
`UNet2DConditionModel` with Stable Diffusion 1.5's published config (`avq_bench.real_configs.SD15_UNET`,
860 M parameters), latent `--sd-sample-size` (64 = 512 px), random 77x768 prompt embeddings.

Quantization: every layer that `avq.quantize(model, preset_config("w2a16"), ...)` would quantize (the
`plan_model` FP-keep rule and spec choice, restricted to `quantizable_layers`; rule 5, "no calibration
input", needs calibration and is not applied) becomes an `AQLinear`/`AQConv2d` with the spec it would get,
but with *random* codes, codebooks and scales: latency and memory do not depend on the values, so no
calibration or solving is needed. Kept-FP layers stay dense.

Rows:
- `"kind": "memory"` (one per model): parameter count; bytes of the Linear/Conv2d *weights* (biases are not
  weights; dense layers carry them too): dense fp16 vs stored (codes as stored in `model.safetensors`, one
  uint8/uint16 per code, and ideally bit-packed at B bits; codebooks and scales fp16; kept-FP layers fp16)
  and the ratios (acceptance: stored <= 1/6 of fp16 at W2, everything stored counted); whole-model bytes
  (every parameter at fp16, vs the quantized model's parameters at fp16 with codes as above).
- `"kind": "step"` (per model, variant, batch): `variant` = `fp` (dense model), `auto` (quantized, automatic
  kernel dispatch), `dequant` (quantized, `AVQ_KERNEL=dequant`); median latency over repeats after warm-up
  under `torch.no_grad()`, with class labels; peak memory; `first_call_ms`, the first forward of the batch
  size, with the CPU kernel choices `auto` measures on it (in a choice cache of the run, not the user's, so
  every run starts as on a new host), and for `auto` `kernels`, how many AQ layers ran each kernel at that
  batch (`-mt`: threaded). Each (model, variant) runs in a fresh subprocess
  (`--in-process` to disable) so allocator state and peaks of one never leak into another. Peak memory: on
  CUDA `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats` (absolute, weights included, and
  the delta over what was allocated before the step); on CPU the process's peak resident set `VmHWM` from
  `/proc/self/status`, reset before each batch by writing 5 to `/proc/self/clear_refs` (absolute, i.e. with
  the interpreter, libraries and weights, and the delta over `VmRSS` before the step). Batches run in
  ascending order in one process, so batch 8's delta can reuse memory the allocator kept from batch 1: the
  absolute peak is the robust figure. The last `auto` row has `rel_err_vs_dequant`: max |y_auto - y_dequant|
  / max |y_dequant| of the model output at the first batch size, a check that the fused kernels compute the
  same step. Each `auto` step row also has `side_by_side`: the FP model is built again in the `auto` worker
after its peaks are taken, and FP and W2 steps are timed in interleaved rounds (`side_by_side`): the W2/FP
ratio to read, since latencies of separate processes drift on a shared machine. `--quick` runs on one CPU
thread (`--threads`): a tiny model on a shared machine is steadier so.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn as nn

from avq.calibration.statistics import quantizable_layers
from avq.core.modules import AQModule, replace_module
from avq.core.qweight import QuantizedWeight, code_dtype
from avq.core.spec import QuantSpec
from avq.kernels import autotune, choice, compiled, routes
from avq.planning.plan import LayerPlan, plan_model
from avq.planning.presets import preset_config
from avq_bench.results import write_results

MODELS = ("digits-unet-mini", "digits-unet", "ldm4-imagenet", "sd1.5")
TEXT_TOKENS = 77  # SD 1.5's prompt length (CLIP), the cross-attention context of the `sd1.5` rows
VARIANTS = ("fp", "auto", "dequant")
PRESET = "w2a16"
FP16_BYTES = 2
MIB = 2**20


# ----------------------------------------------------------------------------- models
def ldm4_config(channels: int = 192, sample_size: int = 64) -> dict:
    """LDM-4 ImageNet's UNet shape as a `UNet2DModel` config; `channels` scales model_channels (mult kept)."""
    return dict(
        sample_size=sample_size,
        in_channels=3,
        out_channels=3,
        block_out_channels=tuple(channels * m for m in (1, 2, 3, 5)),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=32,
        num_class_embeds=1001,
    )


def model_available(name: str) -> str | None:
    """None if `name` can be built here, else the reason it is skipped."""
    if name in ("ldm4-imagenet", "sd1.5"):
        return None
    from avq_bench.reference import ASSETS

    if not (ASSETS / name / "config.json").is_file():
        return f"no shipped model folder {ASSETS / name} (train it first)"
    return None


def build_model(name: str, dtype: torch.dtype, device: torch.device, args: argparse.Namespace) -> nn.Module:
    """The FP model in eval mode, in `dtype` on `device` (random init for `ldm4-imagenet`, seeded)."""
    if name in ("ldm4-imagenet", "sd1.5"):
        from diffusers import UNet2DConditionModel, UNet2DModel

        from avq_bench.real_configs import SD15_UNET

        torch.manual_seed(0)
        if name == "sd1.5":
            model = UNet2DConditionModel(**{**SD15_UNET, "sample_size": args.sd_sample_size})
        else:
            model = UNet2DModel(**ldm4_config(args.ldm_channels, args.ldm_sample_size))
        if dtype != torch.float32:  # a no-op `.to(float32)` still makes diffusers warn
            model = model.to(dtype=dtype)
    else:
        from avq_bench.reference import load_reference

        model = load_reference(name, dtype=dtype)  # not `.to(dtype)`: diffusers warns about such casts
    return model.to(device).eval().requires_grad_(False)


def model_inputs(model: nn.Module, batch: int, device: torch.device, dtype: torch.dtype) -> dict:
    """One denoising step's inputs: noisy latents, a timestep per sample, class labels (if conditional)."""
    cfg = model.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    gen = torch.Generator().manual_seed(batch)
    kwargs = {
        "sample": torch.randn(batch, cfg.in_channels, size, size, generator=gen).to(device, dtype),
        "timestep": torch.randint(0, 1000, (batch,), generator=gen).to(device),
    }
    if getattr(cfg, "num_class_embeds", None):
        kwargs["class_labels"] = torch.randint(0, cfg.num_class_embeds, (batch,), generator=gen).to(device)
    if getattr(cfg, "cross_attention_dim", None):  # text conditioning: random prompt embeddings
        context = torch.randn(batch, TEXT_TOKENS, cfg.cross_attention_dim, generator=gen)
        kwargs["encoder_hidden_states"] = context.to(device, dtype)
    return kwargs


# ----------------------------------------------------------------------------- quantization
def random_qweight(shape: tuple[int, ...], spec: QuantSpec, gen: torch.Generator) -> QuantizedWeight:
    """Random codes/codebooks/scales of the right shapes and dtypes: timing and memory ignore the values."""
    K = math.prod(shape[1:])
    M, C, g = spec.num_codebooks, spec.codebook_size, spec.group_size
    codes = torch.randint(0, C, (shape[0], K // g, M), generator=gen).to(code_dtype(spec.nbits))
    books = (torch.randn(M, C, g, generator=gen) / (M * g) ** 0.5).half()
    scales = (torch.rand(shape[0], generator=gen) * 0.1 + 0.05).half()
    return QuantizedWeight(spec, shape, codes, books, scales)


def quantize_random(model: nn.Module, preset: str = PRESET, seed: int = 0) -> list[LayerPlan]:
    """Replace in place every layer `avq.quantize` would quantize under `preset` (same plan and specs as
    `plan_model` + `quantizable_layers`) by an AQ module with random values; return the plans."""
    quantizable = set(quantizable_layers(model))
    plans = [p for p in plan_model(model, preset_config(preset)) if p.quantized and p.name in quantizable]
    gen = torch.Generator().manual_seed(seed)
    for plan in plans:
        layer = model.get_submodule(plan.name)
        replace_module(
            model, plan.name, AQModule.from_layer(layer, random_qweight(plan.shape, plan.spec, gen))
        )
    return plans


def weight_memory(model: nn.Module) -> dict:
    """Bytes of a (partly) quantized model, everything stored counted.

    Layer weights (AQ modules and remaining Linear/Conv2d; biases excluded): `dense_fp16_bytes` (every weight
    at fp16), `stored_bytes` (codes one uint8/uint16 per code as in `model.safetensors`, codebooks + scales
    fp16, dense layers fp16), `stored_packed_bytes` (same, codes bit-packed at B bits). Whole model: every
    parameter (and AQ codes) at fp16 vs as stored.
    """
    dense = stored = packed = 0
    n_quant = n_fp = 0
    layer_weights: set[int] = set()
    for module in model.modules():
        if isinstance(module, AQModule):
            n_quant += 1
            codes, spec = module.codes, module.spec
            extra = (module.codebooks.numel() + module.scales.numel()) * FP16_BYTES
            dense += module.num_weights * FP16_BYTES
            stored += codes.numel() * codes.element_size() + extra
            packed += math.ceil(codes.numel() * spec.nbits / 8) + extra
            layer_weights.update(id(t) for t in (module.codebooks, module.scales))
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            n_fp += 1
            nbytes = module.weight.numel() * FP16_BYTES
            dense, stored, packed = dense + nbytes, stored + nbytes, packed + nbytes
            layer_weights.add(id(module.weight))
    # Biases, norms, embeddings: fp16 in both the dense and the quantized model.
    other = sum(p.numel() * FP16_BYTES for p in model.parameters() if id(p) not in layer_weights)
    params_fp16 = dense + other  # every parameter of the dense model at fp16
    return {
        "quantized_layers": n_quant,
        "fp_layers": n_fp,
        "layer_dense_fp16_bytes": dense,
        "layer_stored_bytes": stored,
        "layer_stored_packed_bytes": packed,
        "layer_ratio": stored / dense if dense else None,
        "layer_ratio_packed": packed / dense if dense else None,
        "model_fp16_bytes": params_fp16,
        "model_stored_bytes": stored + other,
        "model_stored_packed_bytes": packed + other,
        "model_ratio": (stored + other) / params_fp16 if params_fp16 else None,
        "model_ratio_packed": (packed + other) / params_fp16 if params_fp16 else None,
    }


# ----------------------------------------------------------------------------- measurement
def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict]:
    """Fill a dict with the peak memory of the block: absolute and delta over the start (MiB)."""
    out: dict = {}
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        yield out
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        out["memory_method"] = "torch.cuda.max_memory_allocated"
    else:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current VmRSS (Linux >= 4.0)
            method = "VmHWM after clear_refs=5 (/proc/self/status)"
        except OSError:
            method = "VmHWM since process start (/proc/self/status; clear_refs not writable)"
        before = _proc_status_kib("VmRSS") * 1024
        yield out
        peak = _proc_status_kib("VmHWM") * 1024
        out["memory_method"] = method
    out["peak_mib"] = peak / MIB
    out["peak_delta_mib"] = (peak - before) / MIB
    out["before_mib"] = before / MIB


def _seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of one call of `fn` (CUDA synchronised before and after)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def time_step(
    fn: Callable[[], object], device: torch.device, warmup: int, repeats: int, target_s: float
) -> dict:
    """Median latency (ms) after `warmup` calls; at least `repeats` timed calls, more (up to 20) while
    they fit in `target_s` seconds."""

    first = [_seconds(fn, device) for _ in range(max(1, warmup))]
    n = max(repeats, min(20, int(target_s / max(first[-1], 1e-6))))
    times = [_seconds(fn, device) for _ in range(n)]
    return {
        "latency_ms": statistics.median(times) * 1e3,
        "latency_min_ms": min(times) * 1e3,
        "repeats": n,
        "first_call_ms": first[0] * 1e3,
    }


SIDE_BY_SIDE_MIN_ROUNDS = 5  # a ratio from 3 rounds of an 800 ms step moved by 30 % between runs here


def side_by_side(
    fp: Callable[[], object], auto: Callable[[], object], device: torch.device, warmup: int, repeats: int,
    target_s: float,
) -> dict[str, float | int]:  # fmt: skip
    """FP and W2 steps timed in interleaved rounds (one call of each per round, the order reversed every
    other round) after `warmup` rounds: a slower or busier stretch of the machine hits both alike, so their
    ratio holds where latencies from separate processes drift (on 2 shared cores, FP `digits-unet` read 11-14
    ms across processes). At least `max(repeats, SIDE_BY_SIDE_MIN_ROUNDS)` rounds, more (up to 20) while they
    fit in `target_s`. Median latencies (ms), and the median, least and greatest of the per-round W2/FP
    ratios: their spread is how far the ratio can be trusted."""

    for _ in range(max(1, warmup)):
        last = _seconds(fp, device) + _seconds(auto, device)
    rounds = max(repeats, SIDE_BY_SIDE_MIN_ROUNDS, min(20, int(target_s / max(last, 1e-6))))
    fp_s, auto_s = [], []
    for i in range(rounds):
        if i % 2 == 0:
            fp_s.append(_seconds(fp, device))
            auto_s.append(_seconds(auto, device))
        else:
            auto_s.append(_seconds(auto, device))
            fp_s.append(_seconds(fp, device))
    ratios = [a / f for a, f in zip(auto_s, fp_s, strict=True)]
    return {
        "fp_ms": statistics.median(fp_s) * 1e3, "auto_ms": statistics.median(auto_s) * 1e3,
        "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
        "rounds": rounds,
    }  # fmt: skip


def measure(name: str, variant: str, args: argparse.Namespace) -> list[dict]:
    """Rows of one (model, variant): the memory row (quantized variants) and one step row per batch."""
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    model = build_model(name, dtype, device, args)
    params = sum(p.numel() for p in model.parameters())
    plans = quantize_random(model) if variant != "fp" else []
    gc.collect()
    common = {
        "model": name,
        "params": params,
        "device": device.type,
        "dtype": str(dtype).removeprefix("torch."),
    }
    if name == "ldm4-imagenet":
        common["ldm_channels"], common["sample_size"] = args.ldm_channels, args.ldm_sample_size
    if name == "sd1.5":
        common["sample_size"], common["text_tokens"] = args.sd_sample_size, TEXT_TOKENS
    rows: list[dict] = []
    if variant == "auto":
        specs = sorted({p.spec.name for p in plans})
        rows.append(
            {
                **common,
                "kind": "memory",
                "preset": PRESET,
                "specs": specs,
                **(mem := weight_memory(model)),
                "layer_ratio_le_1_6": mem["layer_ratio"] <= 1 / 6,
                "values": "random codes/codebooks/scales (memory does not depend on the values)",
            }
        )
    build_s = time.perf_counter() - t0
    kernel = "dequant" if variant == "dequant" else None
    for batch in args.batches:
        kwargs = model_inputs(model, batch, device, dtype)
        row = {**common, "kind": "step", "variant": variant, "batch": batch, "build_s": round(build_s, 2)}
        if variant != "fp":
            row["preset"] = PRESET
            row["values"] = "random codes/codebooks/scales (latency does not depend on the values)"
        if device.type == "cpu":
            row["threads"] = torch.get_num_threads()
            if variant != "fp":
                row["cpu_kernels"] = compiled.backend()  # native C, numba or None (torch)
        with torch.no_grad(), choice.forced_kernel(kernel), peak_memory(device) as mem:
            timing = time_step(
                lambda kw=kwargs: model(**kw), device, args.warmup, args.repeats, args.target_s
            )
        if variant == "auto":  # what each AQ layer's forward ran (its route's kernel) at this batch
            chosen = [routes.kernel_of(m) or "none" for m in model.modules() if isinstance(m, AQModule)]
            row["kernels"] = {k: chosen.count(k) for k in sorted(set(chosen))}
        rows.append({**row, **timing, **mem})
        print(_line(rows[-1]), file=sys.stderr, flush=True)
    if variant == "auto":  # after the measurements, so it cannot affect their peaks
        kwargs = model_inputs(model, args.batches[0], device, dtype)
        with torch.no_grad():
            y = model(**kwargs).sample.float()
            with choice.forced_kernel("dequant"):
                ref = model(**kwargs).sample.float()
        rows[-1]["rel_err_vs_dequant"] = float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
        # The W2/FP ratio side by side: the FP model built again in this process (after the peaks above).
        fp_model = build_model(name, dtype, device, args)
        for row in (r for r in rows if r.get("kind") == "step"):
            kw = model_inputs(model, row["batch"], device, dtype)
            with torch.no_grad():
                paired = side_by_side(
                    lambda kw=kw: fp_model(**kw), lambda kw=kw: model(**kw),
                    device, args.warmup, args.repeats, args.target_s,
                )  # fmt: skip
            row["side_by_side"] = paired
            print(
                f"{name} batch={row['batch']} side by side: W2/FP x{paired['ratio']:.3f}"
                f" ({paired['ratio_min']:.3f}-{paired['ratio_max']:.3f} over {paired['rounds']} rounds)",
                file=sys.stderr,
            )
    return rows


def _line(row: dict) -> str:
    return (
        f"{row['model']} {row['variant']} batch={row['batch']}: {row['latency_ms']:.1f} ms "
        f"(x{row['repeats']}), peak {row['peak_mib']:.0f} MiB (+{row['peak_delta_mib']:.0f})"
    )


def run_subprocess(name: str, variant: str, args: argparse.Namespace) -> list[dict]:
    """`measure` in a fresh interpreter, so peaks and allocator state of variants never mix."""
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--worker", f"{name}:{variant}",
        "--device", args.device, "--batches", ",".join(map(str, args.batches)),
        "--warmup", str(args.warmup), "--repeats", str(args.repeats), "--target-s", str(args.target_s),
        *(["--threads", str(args.threads)] if args.threads else []),
        "--ldm-channels", str(args.ldm_channels), "--ldm-sample-size", str(args.ldm_sample_size),
        "--sd-sample-size", str(args.sd_sample_size),
    ]  # fmt: skip
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=args.worker_timeout)
    if proc.returncode != 0:
        return [
            {"model": name, "kind": "step", "variant": variant, "skipped": f"worker exit {proc.returncode}"}
        ]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="digits-unet-mini, few repeats (< 60 s)")
    parser.add_argument(
        "--models", type=lambda s: s.split(","), default=None, help=f"from {','.join(MODELS)}"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", type=lambda s: [int(v) for v in s.split(",")], default=[1, 8])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="minimum timed calls")
    parser.add_argument("--target-s", type=float, default=3.0, help="add repeats (<= 20) up to this time")
    parser.add_argument("--ldm-channels", type=int, default=192, help="LDM-4 model_channels (192 = real)")
    parser.add_argument("--ldm-sample-size", type=int, default=64, help="LDM-4 latent size (64 = real)")
    parser.add_argument("--sd-sample-size", type=int, default=64, help="SD 1.5 latent size (64 = 512 px)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--in-process", action="store_true", help="no worker subprocesses (peaks may mix)")
    parser.add_argument("--worker-timeout", type=float, default=3600.0)
    parser.add_argument("--results-dir", default=None, help="default: benchmarks/results")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick and args.threads is None:
        args.threads = 1  # tiny model: one thread is faster and steadier on a shared machine
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # `auto` measures its CPU kernels on its first forward of each batch size, as on a new host
    # (`first_call_ms` includes it), whatever earlier runs left in the user's cache: a choice cache of this
    # run, which its workers inherit.
    cache = autotune.fresh_cache("avq-e2e-bench-") if args.worker is None else contextlib.nullcontext()
    try:
        with cache:
            return _run(args, parser)
    finally:
        torch.set_num_threads(threads)  # main() may be called in-process (tests)


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.worker is not None:
        name, variant = args.worker.split(":")
        print(json.dumps(measure(name, variant, args)))
        return 0
    if args.quick:
        args.models = args.models or ["digits-unet-mini"]
        args.warmup, args.repeats, args.target_s = 1, 3, 0.5
    models = args.models or list(MODELS)
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {','.join(MODELS)}")
    rows: list[dict] = []
    for name in models:
        reason = model_available(name)
        if reason is not None:
            rows.append({"model": name, "kind": "step", "skipped": reason})
            print(f"{name}: skipped ({reason})", file=sys.stderr)
            continue
        for variant in VARIANTS:
            rows += measure(name, variant, args) if args.in_process else run_subprocess(name, variant, args)
    summarize(rows)
    device = torch.device(args.device)
    stem = f"e2e_step_{device.type}" + ("_quick" if args.quick else "")
    path = write_results(stem, rows, device=device, results_dir=args.results_dir)
    print(f"wrote {path}")
    return 0


def summarize(rows: list[dict]) -> None:
    """Print the memory ratios and the quantized/FP latency ratios."""
    fp = {
        (r["model"], r["batch"]): r["latency_ms"]
        for r in rows
        if r.get("variant") == "fp" and "latency_ms" in r
    }
    for r in rows:
        if r.get("kind") == "memory":
            print(
                f"{r['model']}: {r['params'] / 1e6:.2f} M params, {r['quantized_layers']} AQ + "
                f"{r['fp_layers']} FP layers; layer weights "
                f"{r['layer_dense_fp16_bytes'] / MIB:.2f} MiB fp16 -> "
                f"{r['layer_stored_bytes'] / MIB:.2f} MiB stored (x{r['layer_ratio']:.3f}; "
                f"bit-packed x{r['layer_ratio_packed']:.3f}); whole model x{r['model_ratio']:.3f}"
            )
        elif "latency_ms" in r and r["variant"] != "fp" and (r["model"], r["batch"]) in fp:
            ratio = r["latency_ms"] / fp[(r["model"], r["batch"])]
            print(
                f"{r['model']} {r['variant']} batch={r['batch']}: {r['latency_ms']:.1f} ms = x{ratio:.2f} FP"
            )
        elif "latency_ms" in r:
            print(
                f"{r['model']} fp batch={r['batch']}: {r['latency_ms']:.1f} ms, peak {r['peak_mib']:.0f} MiB"
            )


if __name__ == "__main__":
    sys.exit(main())
