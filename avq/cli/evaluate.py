"""`avq eval`: metrics of a sample set. FID, sFID, IS, precision/recall and class accuracy on the digit
classifier (the reference benchmark, `avq_bench`) for its `[N, 1, 16, 16]` images; PSNR/SSIM to FP samples
on identical noise for images of any size and channel count."""

from __future__ import annotations

import argparse
import time

from avq.cli.models import UserError, write_json
from avq.extras import require_bench

DIGITS_SHAPE = (1, 16, 16)  # what the shipped digit classifier reads


def _fidelity_only(args: argparse.Namespace, samples, fp, meta: dict) -> int:
    """Images the digit classifier cannot read (any size and channel count): fidelity to FP on identical
    noise. FID needs a feature network for those images, which avq does not ship."""
    from avq.evaluation.metrics import psnr, ssim

    shape = list(samples.shape)
    if fp is None:
        raise UserError(
            f"{args.samples}: images {shape} are not the digit classifier's [N, 1, 16, 16], so no FID here; "
            "pass --fp FP_SAMPLES.npz (same seed and batch size) for PSNR/SSIM to FP"
        )
    if args.floor:
        raise UserError("--floor is an FID floor: it needs the digit classifier's [N, 1, 16, 16] samples")
    figures = {
        "n_samples": len(samples),
        "shape": shape,
        "psnr": psnr(samples, fp),
        "ssim": ssim(samples, fp),
    }
    print(
        f"{len(samples)} images {shape[1:]}: PSNR to FP {figures['psnr']:.2f} dB  SSIM {figures['ssim']:.4f}"
    )
    print("(no FID: the shipped digit classifier reads [N, 1, 16, 16] images only)")
    if args.json:
        write_json(args.json, {"samples": args.samples, "fp": args.fp, "sample_meta": meta, **figures})
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from avq.evaluation.samples import load_samples

    def read(path: str):
        try:
            return load_samples(path)
        except ValueError as error:
            raise UserError(str(error)) from None

    samples, labels, meta = read(args.samples)
    fp = read(args.fp)[0] if args.fp else None
    floor = read(args.floor)[0] if args.floor else None
    if fp is not None and fp.shape != samples.shape:
        raise UserError(
            f"--fp {args.fp}: shape {list(fp.shape)} differs from the samples' {list(samples.shape)}"
        )
    if samples.shape[1:] != DIGITS_SHAPE:
        return _fidelity_only(args, samples, fp, meta)
    bench = require_bench("avq eval (FID on the digit classifier's features)")
    start = time.perf_counter()
    figures = bench.metrics.evaluate(
        samples,
        labels,
        reference=bench.data.load_digits_images(args.reference),
        fp_samples=fp,
        floor_samples=floor,
    )
    figures["seconds"] = round(time.perf_counter() - start, 2)
    fid_line = f"FID {figures['fid']:.3f}  sFID {figures['sfid']:.3f}  (vs {args.reference} split)"
    print(fid_line)
    if "fid_to_fp" in figures or "fid_floor" in figures:
        to_fp = (
            f"FID to FP {figures['fid_to_fp']:.3f}  sFID to FP {figures['sfid_to_fp']:.3f}"
            if fp is not None
            else ""
        )
        floor_text = (
            f"floor FID {figures['fid_floor']:.3f}  sFID {figures['sfid_floor']:.3f}"
            if floor is not None
            else ""
        )
        print("  ".join(t for t in (to_fp, f"({floor_text})" if floor_text else "") if t))
    print(
        f"IS {figures['is']:.3f} ± {figures['is_std']:.3f}  precision {figures['precision']:.3f}  "
        f"recall {figures['recall']:.3f}"
    )
    print(
        f"class accuracy {figures['class_accuracy']:.4f} (classifier on the reference: "
        f"{figures['reference_accuracy']:.4f})"
    )
    if fp is not None:
        print(f"PSNR to FP {figures['psnr']:.2f} dB  SSIM to FP {figures['ssim']:.4f}")
    if args.json:
        write_json(
            args.json,
            {
                "samples": args.samples,
                "fp": args.fp,
                "floor": args.floor,
                "reference": args.reference,
                "sample_meta": meta,
                **figures,
            },
        )
    return 0
