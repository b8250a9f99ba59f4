"""`avq eval`: metrics of a sample set. FID, sFID, IS, precision/recall and class accuracy on the digit
classifier (the reference benchmark, `avq_bench`) for its `[N, 1, 16, 16]` images; for images of any size
and channel count PSNR/SSIM to FP samples on identical noise, and FID on an Inception weights file the
user points to (`--inception`)."""

from __future__ import annotations

import argparse
import time

from avq.cli.models import UserError, write_json
from avq.extras import require_bench

DIGITS_SHAPE = (1, 16, 16)  # what the shipped digit classifier reads


def _any_images(args: argparse.Namespace, samples, fp, floor, meta: dict) -> int:
    """Images of any size and channel count: PSNR/SSIM to FP on identical noise; with `--inception FILE`
    (FID's Inception-v3 weights on the user's disk, `avq.evaluation.inception`) FID to FP, to `--real`
    images and the floor between two FP sets. Without it, no FID: avq ships no network for such images."""
    from avq.evaluation.metrics import fid, psnr, ssim

    shape = list(samples.shape)
    if fp is None and not (args.inception and args.real):
        raise UserError(
            f"{args.samples}: images {shape} are not the digit classifier's [N, 1, 16, 16]; pass --fp "
            "FP_SAMPLES.npz (same seed and batch size) for PSNR/SSIM to FP, and --inception FILE for FID"
        )
    if (floor is not None or args.real) and not args.inception:
        raise UserError("--floor and --real are FID figures: give --inception FILE (FID's Inception weights)")
    figures: dict = {"n_samples": len(samples), "shape": shape}
    if fp is not None:
        figures.update(psnr=psnr(samples, fp), ssim=ssim(samples, fp))
        print(f"{len(samples)} images {shape[1:]}: PSNR to FP {figures['psnr']:.2f} dB", end="  ")
        print(f"SSIM {figures['ssim']:.4f}")
    if args.inception:
        from avq.evaluation.inception import inception_features, load_inception

        try:
            network = load_inception(args.inception)
        except ValueError as error:
            raise UserError(str(error)) from None
        feats = inception_features(network, samples)
        fp_feats = inception_features(network, fp) if fp is not None else None
        if fp_feats is not None:
            figures["fid_to_fp"] = fid(feats, fp_feats)
        if floor is not None:
            base = fp_feats if fp_feats is not None else feats
            figures["fid_floor"] = fid(base, inception_features(network, floor))
        if args.real:
            real = _read(args.real)[0]
            figures["fid"] = fid(feats, inception_features(network, real))
        shown = "  ".join(f"{k} {figures[k]:.3f}" for k in ("fid", "fid_to_fp", "fid_floor") if k in figures)
        print(f"Inception FID: {shown}")
    else:
        print(
            "(no FID: --inception FILE computes it; the shipped digit classifier reads [N, 1, 16, 16] only)"
        )
    if args.json:
        write_json(args.json, {"samples": args.samples, "fp": args.fp, "sample_meta": meta, **figures})
    return 0


def _read(path: str):
    from avq.evaluation.samples import load_samples

    try:
        return load_samples(path)
    except ValueError as error:
        raise UserError(str(error)) from None


def cmd_eval(args: argparse.Namespace) -> int:
    samples, labels, meta = _read(args.samples)
    fp = _read(args.fp)[0] if args.fp else None
    floor = _read(args.floor)[0] if args.floor else None
    if fp is not None and fp.shape != samples.shape:
        raise UserError(
            f"--fp {args.fp}: shape {list(fp.shape)} differs from the samples' {list(samples.shape)}"
        )
    if samples.shape[1:] != DIGITS_SHAPE or args.inception:
        return _any_images(args, samples, fp, floor, meta)
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
