"""`python -m avq.demo` (`make demo`): quantize one layer of a real diffusers model, offline.

Loads the shipped `digits-unet-mini` (a class-conditional diffusers `UNet2DModel` trained on 16x16 digits),
collects the input Hessian of one mid-network 3x3 resnet conv, and quantizes that layer with RTN and GPTQ
at 2 and 4 bits and with AQ `1x8g4`, `2x8g8` (2 code bits) and `2x8g4` (4 code bits). The table shows the
relative H-weighted error `tr(dW H dW^T) / tr(W H W^T)`, code bits and total bits (codebooks and scales
counted) and the time of each quantizer.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

import avq
from avq.modules import AQModule, replace_module
from avq.reference import collect_hessians, load_reference

DEFAULT_LAYER = "mid_block.resnets.0.conv1"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m avq.demo", description=__doc__)
    parser.add_argument("--layer", default=DEFAULT_LAYER, help="layer to quantize (default: %(default)s)")
    parser.add_argument("--n-samples", type=int, default=1024, help="calibration images (default: 1024)")
    parser.add_argument("--out", type=Path, default=None, help="save the quantized model here")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    model = load_reference("digits-unet-mini")
    n_params = sum(p.numel() for p in model.parameters())
    layer = model.get_submodule(args.layer)
    weight = layer.weight.detach().float()
    print(f"digits-unet-mini: diffusers UNet2DModel, {n_params / 1e6:.2f}M parameters (shipped with avq)")
    print(
        f"layer {args.layer}: {type(layer).__name__} weight {list(weight.shape)}, {weight.numel():,} weights"
    )
    hessian = collect_hessians(model, [args.layer], n_samples=args.n_samples, seed=0)[args.layer]
    print(f"Hessian [{hessian.shape[0]}, {hessian.shape[1]}] from {args.n_samples} noised training images\n")

    jobs = [
        ("rtn", f"int{b}", lambda b=b: avq.quantize_weight_rtn(weight, b, hessian=hessian)) for b in (2, 4)
    ]
    jobs += [("gptq", f"int{b}", lambda b=b: avq.quantize_weight_gptq(weight, hessian, b)) for b in (2, 4)]
    jobs += [
        ("aq", text, lambda text=text: avq.quantize_weight(weight, hessian, avq.QuantSpec.parse(text)))
        for text in ("1x8g4", "2x8g8", "2x8g4")
    ]
    print(f"{'method':<6} {'spec':<6} {'code bits':>9} {'total bits':>10} {'rel. error':>11} {'seconds':>8}")
    results = {}
    for method, spec, job in jobs:
        t0 = time.perf_counter()
        q = job()
        seconds = time.perf_counter() - t0
        results[spec] = q
        error = avq.relative_error(weight, q.dequantize(), hessian)
        print(
            f"{method:<6} {spec:<6} {q.code_bits:>9.2f} {q.total_bits:>10.3f} {error:>11.5f} {seconds:>8.2f}"
        )
        sys.stdout.flush()

    # The layer goes into the model as an AQConv2d, through save/load, and the output is compared to FP.
    torch.manual_seed(0)
    x = torch.randn(8, 1, 16, 16)
    t = torch.linspace(50, 950, 8).long()
    labels = torch.arange(8)
    with torch.no_grad():
        reference = model(x, t, class_labels=labels).sample
    replace_module(model, args.layer, AQModule.from_layer(layer, results["2x8g8"]))
    with tempfile.TemporaryDirectory() as tmp:
        folder = avq.save_quantized(model, args.out or Path(tmp) / "digits-unet-mini-2x8g8")
        size = sum(f.stat().st_size for f in folder.iterdir())
        loaded = avq.load_quantized(folder)
        with torch.no_grad():
            output = loaded(x, t, class_labels=labels).sample
    drift = float((output - reference).pow(2).sum() / reference.pow(2).sum())
    print(
        f"\nsaved with {args.layer} as AQConv2d 2x8g8 ({size / 1e6:.2f} MB folder), loaded back with"
        f" avq.load_quantized: model output error vs FP on 8 noised inputs = {drift:.2e} (relative MSE)"
    )
    print(f"done in {time.perf_counter() - start:.0f} s.")
    print("The whole model, every layer calibrated across the sampling trajectory:")
    print("  avq quantize --model digits-unet-mini --preset w2a16 --out out/digits-unet-mini-w2")
    return 0


if __name__ == "__main__":
    sys.exit(main())
