"""`avq sample`: images from a pipeline folder (prompts or classes) or a class-conditional model, written
as `samples.npz` (float32 `[N, C, H, W]` in [-1, 1], labels, settings), one PNG per image and a grid."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from avq.cli.models import UserError, load_model, resolve_device, resolve_dtype, write_json


def cmd_sample(args: argparse.Namespace) -> int:
    from avq.pipelines.folders import is_pipeline_folder

    source = args.quantized or args.model
    if is_pipeline_folder(source):
        return _sample_pipeline(args, source)
    for option in ("prompt", "prompts", "classes", "height", "width"):
        if getattr(args, option):
            flag = "--" + option
            raise UserError(f"{flag} needs a pipeline folder (model_index.json) as --model or --quantized")
    return _sample_model(args)


def _sample_model(args: argparse.Namespace) -> int:
    from avq.evaluation.samples import generate_samples, save_samples

    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    if args.n is None:
        raise UserError("--n is required for a class-conditional model")
    if args.quantized:
        from avq.storage.serialization import load_quantized

        model = load_quantized(args.quantized, device=device)
    else:
        model = load_model(args.model).to(device)
    model = model.to(dtype)
    steps, guidance = args.steps or 20, 2.0 if args.guidance is None else args.guidance
    start = time.perf_counter()
    samples, labels = generate_samples(
        model,
        args.n,
        steps=steps,
        guidance=guidance,
        seed=args.seed,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    seconds = time.perf_counter() - start
    meta = {
        "model": args.model,
        "quantized": args.quantized,
        "n": args.n,
        "steps": steps,
        "guidance": guidance,
        "seed": args.seed,
        "batch_size": args.batch_size,
    }
    path = save_samples(args.out, samples, labels, meta)
    print(f"wrote {path} ({args.n} samples, {seconds:.1f} s) and {path.with_suffix('.png')}")
    if args.json:
        write_json(args.json, {**meta, "out": str(path), "seconds": round(seconds, 2)})
    return 0


def _sample_pipeline(args: argparse.Namespace, folder: str) -> int:
    """Run the pipeline on the prompts (or classes), batch `b` from the generator `batch_seed(seed, b)`:
    the FP and the quantized pipeline with the same seed and batch size see identical noise."""
    import inspect

    from avq.evaluation.samples import batch_seed, save_image_files, save_samples
    from avq.pipelines.calibration import call_defaults
    from avq.pipelines.folders import load_pipeline_folder
    from avq.pipelines.prompts import read_prompts

    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    prompts = list(args.prompt or []) + (list(read_prompts(args.prompts)) if args.prompts else [])
    pipe = load_pipeline_folder(folder, device=device, dtype=dtype)
    params = inspect.signature(pipe.__call__).parameters
    default_steps, default_guidance = call_defaults(pipe)
    steps = args.steps or default_steps
    guidance = default_guidance if args.guidance is None else args.guidance
    if "prompt" in params:
        if not prompts:
            raise UserError(f"{folder} is a text-to-image pipeline: give --prompt TEXT or --prompts FILE")
        n = args.n or len(prompts)
        conditions = [prompts[i % len(prompts)] for i in range(n)]
    elif "class_labels" in params:
        if not args.classes:
            raise UserError(f"{folder} is class-conditional: give --classes, e.g. --classes 1 207")
        n = args.n or len(args.classes)
        conditions = [args.classes[i % len(args.classes)] for i in range(n)]
    else:
        if prompts or args.classes:
            raise UserError(f"{folder} is an unconditional pipeline: it takes no --prompt or --classes")
        n = args.n or 1
        conditions = [None] * n
    images, start = [], time.perf_counter()
    for b, lo in enumerate(range(0, n, args.batch_size)):
        batch = conditions[lo : lo + args.batch_size]
        kwargs = {"num_inference_steps": steps, "output_type": "np"}
        kwargs["generator"] = torch.Generator().manual_seed(batch_seed(args.seed, b))
        if "guidance_scale" in params:
            kwargs["guidance_scale"] = guidance
        if "prompt" in params:
            kwargs["prompt"] = batch
        elif "class_labels" in params:
            kwargs["class_labels"] = batch
        else:
            kwargs["batch_size"] = len(batch)
        for key in ("height", "width"):
            if getattr(args, key) and key in params:
                kwargs[key] = getattr(args, key)
                if "use_resolution_binning" in params:  # an explicit size is used as given (PixArt)
                    kwargs["use_resolution_binning"] = False
        out = pipe(**kwargs).images  # [n, H, W, C] in [0, 1]
        images.append(torch.from_numpy(np.asarray(out, dtype=np.float32)))
    seconds = time.perf_counter() - start
    samples = torch.cat(images).permute(0, 3, 1, 2) * 2 - 1  # [N, C, H, W] in [-1, 1]
    labels = torch.tensor([c if isinstance(c, int) else -1 for c in conditions], dtype=torch.int64)
    meta = {
        "model": args.model,
        "quantized": args.quantized,
        "n": n,
        "prompts": [c for c in conditions if isinstance(c, str)],
        "steps": steps,
        "guidance": guidance,
        "seed": args.seed,
        "batch_size": args.batch_size,
    }
    path = save_samples(args.out, samples, labels, meta)
    files = save_image_files(Path(args.out), samples)
    print(
        f"wrote {path}, {len(files)} PNG images and {path.with_suffix('.png')} ({n} samples, {seconds:.1f} s)"
    )
    if args.json:
        write_json(args.json, {**meta, "out": str(path), "seconds": round(seconds, 2)})
    return 0
