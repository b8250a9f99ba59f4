"""`avq bench`: time the kernels behind `AQLinear` on this machine, for a layer shape and spec, against the
dense layer of the same shape: dense `F.linear`, every kernel path that can run here (`lut`, `dequant`,
`triton` on CUDA) and `auto` (what the dispatcher picks), at each number of rows. Codes and codebooks are
random (timings do not depend on them). `benchmarks/kernels.py` is the full sweep with aqlm beside."""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from avq.cli.models import UserError, resolve_device, resolve_dtype, write_json


def _median_ms(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up: compiles, caches derived data
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def random_layer(out_features: int, in_features: int, spec, device, dtype):
    """An `AQLinear` of the shape with random codes, codebooks and scales."""
    from avq.core.modules import AQLinear
    from avq.core.qweight import QuantizedWeight, code_dtype

    g = torch.Generator().manual_seed(0)
    groups = in_features // spec.group_size
    codes = torch.randint(spec.codebook_size, (out_features, groups, spec.num_codebooks), generator=g)
    codebooks = torch.randn(spec.num_codebooks, spec.codebook_size, spec.group_size, generator=g) * 0.1
    q = QuantizedWeight(
        spec=spec,
        shape=(out_features, in_features),
        codes=codes.to(torch.int32).to(code_dtype(spec.nbits)),
        codebooks=codebooks.half(),
        scales=torch.rand(out_features, generator=g).half() + 0.5,
    )
    return AQLinear(q).to(device=device, dtype=dtype).eval()


@torch.no_grad()
def cmd_bench(args: argparse.Namespace) -> int:
    from avq.core.spec import QuantSpec
    from avq.kernels import choice

    try:
        spec = QuantSpec.parse(args.spec)
    except ValueError as error:
        raise UserError(str(error)) from None
    out_features, in_features = args.shape
    if in_features % spec.group_size:
        raise UserError(
            f"--shape {out_features} {in_features}: K is not divisible by group size {spec.group_size}"
        )
    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    layer = random_layer(out_features, in_features, spec, device, dtype)
    dense = layer.qweight.dequantize(dtype).to(device)  # [out, in]
    kernels = ["lut", "dequant"] + (["triton"] if device.type == "cuda" else [])
    rows_out = []
    print(f"{out_features}x{in_features} {spec.name} on {device} ({dtype}), median ms of {args.repeats}:")
    print(f"{'rows':>6} {'dense':>9} " + " ".join(f"{k:>9}" for k in kernels) + f" {'auto':>9}  auto picks")
    for rows in args.rows:
        x = torch.randn(rows, in_features, device=device, dtype=dtype)
        run_dense, run_layer = (lambda x=x: F.linear(x, dense)), (lambda x=x: layer(x))
        figures = {"rows": rows, "dense": _median_ms(run_dense, args.repeats, device)}
        for kernel in kernels:
            with choice.forced_kernel(kernel):
                figures[kernel] = _median_ms(run_layer, args.repeats, device)
        with choice.forced_kernel(None):
            figures["auto"] = _median_ms(run_layer, args.repeats, device)
        figures["auto_kernel"] = choice.choose_linear_kernel(device, dtype, rows, spec, out_features)
        rows_out.append(figures)
        cells = " ".join(f"{figures[k]:>9.4g}" for k in ["dense", *kernels, "auto"])
        print(f"{rows:>6} {cells}  {figures['auto_kernel']}")
    stored = layer.qweight.storage_bits / 8 / 2**20
    print(
        f"weights: {stored:.3f} MiB as {spec.name} ({layer.total_bits:.3f} bits/weight) vs "
        f"{out_features * in_features * 2 / 2**20:.3f} MiB in fp16"
    )
    if args.json:
        write_json(
            args.json,
            {
                "shape": [out_features, in_features],
                "spec": spec.name,
                "device": str(device),
                "dtype": str(dtype).removeprefix("torch."),
                "total_bits": layer.total_bits,
                "rows": rows_out,
            },
        )
    return 0
