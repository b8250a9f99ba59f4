"""The `avq` argument parser: one subparser per subcommand, each bound to its `cmd_*` function."""

from __future__ import annotations

import argparse

from avq.cli.bench import cmd_bench
from avq.cli.evaluate import cmd_eval
from avq.cli.finetune import cmd_finetune
from avq.cli.models import SHIPPED_MODELS, SHIPPED_PIPELINES
from avq.cli.quantize import cmd_quantize
from avq.cli.sample import cmd_sample
from avq.core.aq import SolverOptions
from avq.planning.presets import METHODS, PRESETS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="avq", description="Additive vector quantization of diffusion models."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser(
        "quantize",
        help="quantize a diffusers pipeline's denoiser or a model (time step-aware calibration, then layer "
        "by layer)",
        description="Calibrate on the FP sampler (a pipeline folder: the pipeline's own scheduler, steps, "
        "guidance and text encoders on real prompts; a model folder or shipped model: DDIM 20 steps), "
        "quantize every Linear/Conv2d of the denoiser (FP-keep rule in avq.planning.plan), print a "
        "per-layer table and save: a pipeline folder (every other component as it was) or an avq save.",
    )
    q.add_argument(
        "--model",
        required=True,
        help=f"diffusers pipeline folder (model_index.json), diffusers model folder, or a shipped model "
        f"({', '.join(SHIPPED_MODELS)}) or pipeline ({', '.join(SHIPPED_PIPELINES)})",
    )
    q.add_argument("--preset", required=True, choices=PRESETS, help="weight/activation bits")
    q.add_argument(
        "--method", default="avq", choices=METHODS, help="avq (default), or the uniform gptq/rtn baselines"
    )
    q.add_argument(
        "--group-size",
        type=_positive,
        default=None,
        help="gptq/rtn: inputs per uniform grid, e.g. 128 (default: one grid per output channel)",
    )
    q.add_argument(
        "--out",
        required=True,
        help="output folder: a pipeline folder for a pipeline, else an avq save (config.json + weights)",
    )
    q.add_argument("--json", help="write the figures (per-layer rows, summary) to this JSON file")
    q.add_argument("--resume", action="store_true", help="continue an interrupted run from <out>.partial/")
    q.add_argument("--num-samples", type=_positive, default=64, help="calibration samples (default 64)")
    q.add_argument("--batch-size", type=_positive, default=16, help="calibration batch size (default 16)")
    q.add_argument(
        "--steps",
        type=_positive,
        default=None,
        help="sampler steps of the calibration (default: the pipeline's own; DDIM 20 for a bare model)",
    )
    q.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="classifier-free guidance of the calibration (default: the pipeline's own; 2.0 for a model)",
    )
    q.add_argument("--prompts", metavar="FILE", help="calibration prompts, one a line (default: 64 built-in)")
    q.add_argument("--negative-prompt", help="null input of guidance (default: the pipeline's empty prompt)")
    q.add_argument(
        "--classes", type=int, nargs="+", help="class labels of a class-conditional pipeline (default: all)"
    )
    q.add_argument("--height", type=_positive, help="image height in pixels (default: the pipeline's)")
    q.add_argument("--width", type=_positive, help="image width in pixels (default: the pipeline's)")
    _device_options(q)
    q.add_argument(
        "--max-hessian-gib",
        type=_positive_float,
        default=None,
        help="layers hooked per calibration pass so that their Hessian accumulators fit this (default: a "
        "quarter of the device's free memory after the solver's buffers)",
    )
    q.add_argument(
        "--timesteps-kept", type=_positive, default=10, help="steps whose inputs feed the statistics"
    )
    q.add_argument("--seed", type=int, default=0)
    q.add_argument(
        "--solver-rounds",
        type=_positive,
        default=None,
        metavar="N",
        help=f"AVQ: at most N rounds of (codes, codebooks, scales) per layer (default: "
        f"{SolverOptions.max_rounds}, stopping earlier when a round gains < "
        f"{SolverOptions.tol * 100:g}%%); 1-2 rounds give a quick draft at a somewhat higher layer error",
    )
    q.add_argument(
        "--sequential",
        action="store_true",
        help="calibrate block by block on the model quantized so far (one sampler run per block)",
    )
    q.add_argument(
        "--bits-budget",
        type=_positive_float,
        default=None,
        metavar="B",
        help="LAQ: choose each layer's spec (1x8g4, 1x4g2, 2x8g4, 2x4g2 or FP) from its measured effect on "
        "the model output, under B total bits per weight over all Linear/Conv2d weights (codebooks, scales "
        "and FP layers counted); default: the preset's first fitting spec",
    )
    q.add_argument(
        "--laq-uniform",
        type=_uniform_specs,
        default=(),
        metavar="SPECS",
        help="with --bits-budget: uniform GPTQ grids LAQ may also choose per layer, at their total bits, "
        "comma-separated, e.g. int4,int4g128",
    )
    q.add_argument(
        "--laq-min-bits",
        type=float,
        default=None,
        metavar="B",
        help="with --bits-budget: give no layer fewer than B code bits (LAQ then chooses each layer's "
        "representation and where to spend more; the timestep/conditioning layers never get fewer than "
        "the preset's code bits either way)",
    )
    q.add_argument(
        "--laq-probe",
        choices=("block", "model"),
        default="model",
        help="with --bits-budget: measure each layer's effect on the whole model (model, the default) or "
        "on its top-level block, scaled by one whole-model probe per block (block: fewer whole-model "
        "forwards, less accurate: see the README)",
    )
    q.add_argument(
        "--sensitivity",
        metavar="JSON",
        default=None,
        help="with --bits-budget: reuse the LAQ sensitivity table of an earlier run of the same model and "
        "calibration (its --json figures) instead of measuring it again, e.g. to sweep budgets",
    )
    q.add_argument(
        "--tracker",
        choices=("none", "wandb"),
        default="none",
        help="log config, per-layer table and figures (wandb: offline unless logged in or WANDB_MODE is set)",
    )
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(func=cmd_quantize)

    f = sub.add_parser(
        "finetune",
        help="SeMI-PV: fine-tune an avq save or quantized pipeline against its FP model (data-free)",
        description="PV-Tuning with selective momentum invalidation (avq.finetune): distill the FP teacher "
        "(the save's recorded source model, or --teacher) into the quantized model on the teacher's own "
        "sampling trajectories; AdamW on codebooks, scales and FP parameters, straight-through code "
        "updates. Checkpoints every --checkpoint-every steps to <out>.partial/ (atomic; --resume after an "
        "interruption). Under `torchrun --nproc_per_node=N` the batches are shared out among the processes.",
    )
    f.add_argument("--quantized", required=True, help="avq save folder (from `avq quantize`)")
    f.add_argument("--steps", type=_positive, required=True, help="optimizer steps")
    f.add_argument("--out", required=True, help="output folder for the fine-tuned avq save")
    f.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
    f.add_argument(
        "--tracker",
        choices=("none", "wandb"),
        default="none",
        help="log loss, fraction of codes changed, learning rates and sample grids (wandb: offline unless "
        "logged in or WANDB_MODE is set)",
    )
    f.add_argument(
        "--teacher", help="FP teacher (shipped model or diffusers folder); default: the recorded source"
    )
    f.add_argument("--checkpoint-dir", help="checkpoint folder (default <out>.partial)")
    f.add_argument("--checkpoint-every", type=_positive, help="steps between checkpoints (default 50)")
    f.add_argument("--batch-size", type=_positive, help="trajectory points per step over all processes (16)")
    f.add_argument("--seed", type=int)
    f.add_argument("--semi", choices=("selective", "none", "all"), help="momentum reset on code changes")
    f.add_argument("--lr-codebooks", type=float, help="P step: AdamW rate of the codebooks")
    f.add_argument("--lr-scales", type=float, help="P step: AdamW rate of the scales")
    f.add_argument("--lr-fp", type=float, help="P step: AdamW rate of the parameters left in FP")
    f.add_argument("--lr-shadow", type=float, help="V step: AdamW rate of the straight-through weights")
    f.add_argument("--warmup", type=int, help="steps of linear learning-rate warm-up (10)")
    f.add_argument("--v-every", type=int, help="steps between code updates (1; 0: none, P only)")
    f.add_argument(
        "--v-metric",
        choices=("hessian", "l2"),
        help="the code search's metric: L2 (default), or the layer inputs' Gram blocks on the step's batch",
    )
    f.add_argument("--max-code-change", type=float, help="max fraction of a layer's codes changed per V step")
    f.add_argument("--trust-ratio", type=float, help="max relative weight change of a layer per V step")
    f.add_argument("--beam-width", type=_positive, help="beam width of the code search")
    f.add_argument("--trajectories", type=_positive, help="teacher trajectories sampled per epoch (32)")
    f.add_argument(
        "--sampling-steps",
        type=_positive,
        help="steps of the teacher trajectories (DDIM 20; a pipeline: its own)",
    )
    f.add_argument(
        "--guidance", type=float, help="guidance of the teacher sampler (2.0; a pipeline: its own default)"
    )
    f.add_argument(
        "--prompts", metavar="FILE", help="pipelines: teacher prompts, one a line (default: built-in)"
    )
    f.add_argument("--height", type=_positive, help="pipelines: image height of the teacher trajectories")
    f.add_argument("--width", type=_positive, help="pipelines: image width of the teacher trajectories")
    f.add_argument("--timestep-sampling", choices=("uniform", "stratified"))
    f.add_argument("--block-loss-weight", type=float, help="weight of block-output matching (0: off)")
    f.add_argument("--sample-every", type=int, help="log a sample grid every N steps (0: never)")
    f.add_argument(
        "--device", help="cpu, cuda, cuda:N (default: cuda:LOCAL_RANK when CUDA is available, else cpu)"
    )
    f.add_argument("--dtype", default="float32", help="float32 (default), float16 or bfloat16: compute dtype")
    f.add_argument("--json", help="write the settings, figures and per-step history to this JSON file")
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    f.set_defaults(func=cmd_finetune)

    s = sub.add_parser(
        "sample",
        help="images from a pipeline (prompts or classes) or a class-conditional model to samples.npz + PNGs",
        description="A pipeline folder (--model, or --quantized from `avq quantize`): runs the pipeline on "
        "--prompt/--prompts (text-to-image) or --classes (class-conditional) and writes samples.npz, one "
        "PNG per image and a grid. A class-conditional model or avq save: N class-balanced DDIM samples "
        "(labels i %% classes). Same seed and batch size: same noise.",
    )
    s.add_argument(
        "--model",
        default="digits-unet-mini",
        help="pipeline folder, shipped model or pipeline (digits-t2i), or diffusers model folder",
    )
    s.add_argument("--quantized", help="quantized pipeline folder or avq save; takes precedence over --model")
    s.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    s.add_argument("--prompts", metavar="FILE", help="prompts, one a line")
    s.add_argument("--classes", type=int, nargs="+", help="class labels of a class-conditional pipeline")
    s.add_argument("--n", type=_positive, default=None, help="number of samples (default: one per prompt)")
    s.add_argument(
        "--steps", type=_positive, default=None, help="sampler steps (default: the pipeline's; 20)"
    )
    s.add_argument("--guidance", type=float, default=None, help="guidance (default: the pipeline's; 2.0)")
    s.add_argument("--height", type=_positive, help="image height (pipelines; default: the pipeline's)")
    s.add_argument("--width", type=_positive, help="image width (pipelines; default: the pipeline's)")
    _device_options(s)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=_positive, default=100, help="samples per batch (default 100)")
    s.add_argument("--out", required=True, help="output folder (samples.npz, samples.png)")
    s.add_argument("--json", help="write the run's settings and time to this JSON file")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_sample)

    e = sub.add_parser(
        "eval",
        help="FID, sFID, IS, precision/recall, class accuracy (+ PSNR/SSIM to FP) of a samples.npz",
        description="Metrics on the shipped digit classifier's features against a digits split; with "
        "--fp, fidelity to FP samples on identical noise; with --floor, the FID floor between two FP "
        "sample sets of different seeds.",
    )
    e.add_argument("samples", help="samples.npz written by `avq sample`")
    e.add_argument("--fp", help="FP samples.npz of the same seed and batch size (PSNR, SSIM, FID to FP)")
    e.add_argument("--floor", help="FP samples.npz of another seed: FID floor")
    e.add_argument(
        "--inception",
        metavar="FILE",
        help="FID's Inception-v3 weights as safetensors (see avq.evaluation.inception): FID for images of "
        "any size, to --fp, to --real and the --floor",
    )
    e.add_argument("--real", metavar="NPZ", help="with --inception: real images (samples.npz layout) for FID")
    e.add_argument(
        "--reference", default="test", choices=("test", "train"), help="real images (default test)"
    )
    e.add_argument("--json", help="write the figures to this JSON file")
    e.set_defaults(func=cmd_eval)

    b = sub.add_parser(
        "bench",
        help="time AQLinear's kernels (LUT, dequantize + GEMM, Triton on CUDA, auto) against dense",
        description="Kernel timings on this machine for one layer shape and spec, random codes: dense "
        "F.linear, each kernel path that can run here, and the automatic choice, per number of rows.",
    )
    b.add_argument("--shape", type=_positive, nargs=2, default=(4096, 4096), metavar=("N", "K"))
    b.add_argument("--spec", default="2x8g8", help="AQ spec MxBgG (default 2x8g8)")
    b.add_argument(
        "--rows", type=_positive, nargs="+", default=(1, 16, 256), help="GEMM rows (default 1 16 256)"
    )
    b.add_argument("--repeats", type=_positive, default=20, help="timed calls per figure (median)")
    _device_options(b)
    b.add_argument("--json", help="write the figures to this JSON file")
    b.set_defaults(func=cmd_bench)
    return parser


def _device_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", help="compute device: cpu, cuda, cuda:N (default: cuda if available)")
    parser.add_argument(
        "--dtype", default="float32", help="float32 (default), float16 or bfloat16: the model's dtype"
    )


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _uniform_specs(text: str) -> tuple:
    from avq.core.spec import UniformSpec

    try:
        return tuple(UniformSpec.parse(part) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value
