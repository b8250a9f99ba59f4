"""Kernel benchmark: dense GEMM vs dequantize + GEMM vs the fused VQ kernels (and `aqlm`'s, where installed).

    python benchmarks/kernels.py                    # full run -> benchmarks/results/kernels_<device>.json
    python benchmarks/kernels.py --quick            # smoke run, under a minute -> kernels_<device>_quick.json
    python benchmarks/kernels.py --no-conv          # GEMMs only
    python benchmarks/kernels.py --max-seconds 900  # stop timing after 15 minutes (rest recorded as skipped)

`<device>` is `cpu` or `cuda`. Runs unchanged on a CPU or a CUDA machine (`--device` to force).

GEMM rows (`"op": "linear"`): `y = x W^T` for `x [rows, K]`, `W [N, K]` on layer shapes of the LDM-4 ImageNet
UNet (model_channels 192, mult 1-2-3-5), the SD 1.x UNet and DiT-XL/2, 3x3 convs as `[out, in*9]` GEMMs, and
the `[4096, 4096]` acceptance shape, for `rows` in 1, 16, 256, 4096. Methods:
- `dense`: the decoded weight as a dense matrix; `torch` fp32 matmul on CPU, cuBLAS fp16 on CUDA (timed
  once per shape and rows, so its rows carry `"spec": null`);
- `dequant_gemm`: decode the weight from codes on every call (`avq.kernels.weights.dense_weight`), then GEMM;
- `fused`: the fused kernel; Triton VQ-GEMM on CUDA (autotuned; first call excluded), the LUT GEMM on CPU
  (never the Triton interpreter);
- `auto`: what `AQLinear` picks with `AVQ_KERNEL` unset (the row names the kernel it chose; on CPU up to
  64 rows that choice is measured on the first call, `"kernel_choice": "measured"`, in a choice cache of
  this run: `avq.kernels.autotune`);
- `aqlm_numba` (CPU; its only CPU kernel, `numba_gemm_lut`: codebooks of 256 entries, any M and g, fp32):
  called with aqlm's own CPU layout (codes transposed to `[K/g, N, M]` int8) and numba's default threads;
  its `prange` over input groups races on the shared output vector when numba runs more than one thread
  (`rel_err` ~0.1 measured), so `aqlm_numba_1thread` times the same kernel on one numba thread, where it
  is correct;
- `aqlm_triton` (CUDA; any spec with g a power of two) and `aqlm_cuda` (CUDA; 1x16g8, 2x8g8, 1x8g8, if its
  extension compiles on the machine): aqlm's GPU kernels with its own layouts, fp16.
Weights are random codes/codebooks/scales (timing does not depend on the values). Each row has the median
latency over repeats after warmup (ms), effective TFLOP/s (`2*rows*N*K / latency`), the bytes stored for the
weight (codes at B bits + fp16 codebooks + fp16 scales) next to the fp16 dense bytes, and `rel_err`
(max |y - y_dense| / max |y_dense|, a check that each kernel computes the same product).

Conv rows (`"op": "conv"`): 3x3 convs (stride 1, padding 1) of the same UNets at their latent resolutions,
batch 1 and 8: `dense` `F.conv2d`, `dequant_conv` (decode + `F.conv2d`), `implicit` (unfold + fused kernel),
`auto` (the `AQConv2d` dispatch) and on CPU `fused_conv` (the native decode-GEMM, one of `auto`'s
candidates). The largest `rows` (= batch*H*W) where `implicit` beats `dequant_conv`
is the number to put in `avq.kernels.conv.GPU_IMPLICIT_MAX_ROWS`.

Combinations whose single call would exceed `--max-call-seconds`, or a LUT larger than `--max-lut-mib`, are
recorded with `"skipped"` and the reason instead of a latency.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from avq import AQConv2d, AQLinear, QuantizedWeight, QuantSpec
from avq.core.qweight import code_dtype
from avq.kernels import autotune, choice, compiled, dispatch, fused
from avq_bench.results import write_results

# (family, [N, K]) GEMM shapes.
LINEAR_SHAPES = [
    ("ldm4-imagenet", (576, 576)),  # attention projections at 16x16 (192*3 channels)
    ("ldm4-imagenet", (960, 960)),
    ("ldm4-imagenet", (384, 384 * 9)),  # 3x3 conv as [out, in*9]
    ("ldm4-imagenet", (960, 960 * 9)),
    ("sd1.x", (320, 320)),
    ("sd1.x", (640, 640)),
    ("sd1.x", (1280, 1280)),
    ("sd1.x", (1280, 5120)),  # feed-forward out
    ("sd1.x", (5120, 1280)),  # feed-forward in (one GEGLU half)
    ("sd1.x", (320, 320 * 9)),
    ("sd1.x", (1280, 1280 * 9)),
    ("dit-xl/2", (1152, 1152)),
    ("dit-xl/2", (4608, 1152)),
    ("dit-xl/2", (1152, 4608)),
    ("acceptance", (4096, 4096)),
]
# (family, out, in, H=W, batch) 3x3 convs at the latent resolutions where they run.
CONV_SHAPES = [
    ("ldm4-imagenet", 192, 192, 64),
    ("ldm4-imagenet", 960, 960, 8),
    ("sd1.x", 320, 320, 64),
    ("sd1.x", 640, 640, 32),
    ("sd1.x", 1280, 1280, 16),
    ("sd1.x", 1280, 1280, 8),
]
SPECS = ["1x8g4", "2x8g8", "2x8g4", "1x16g8"]
ROWS = [1, 16, 256, 4096]
QUICK_LINEAR = [("sd1.x", (1280, 1280)), ("acceptance", (4096, 4096))]
QUICK_CONV = [("sd1.x", 1280, 1280, 8)]


# ----------------------------------------------------------------------------- helpers
def random_qweight(shape: tuple[int, ...], spec: QuantSpec, device: torch.device) -> QuantizedWeight:
    """Random codes/codebooks/scales: kernel timing does not depend on the values."""
    gen = torch.Generator().manual_seed(0)
    K = 1
    for d in shape[1:]:
        K *= d
    M, C, g = spec.num_codebooks, spec.codebook_size, spec.group_size
    codes = torch.randint(0, C, (shape[0], K // g, M), generator=gen).to(code_dtype(spec.nbits))
    books = (torch.randn(M, C, g, generator=gen) / (M * g) ** 0.5).half()
    scales = (torch.rand(shape[0], generator=gen) + 0.5).half()
    return QuantizedWeight(spec, shape, codes, books, scales).to(device)


def weight_bytes(qw: QuantizedWeight) -> int:
    return qw.storage_bits // 8


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], torch.Tensor], device: torch.device, max_call_s: float) -> dict:
    """Median latency (ms) over repeats; the first call (compile, autotune, caches) is excluded and the
    second (warm) call sizes the number of repeats (~0.5 s of timing, 5 to 100 repeats)."""

    def timed() -> float:
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - start

    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    first = time.perf_counter() - start
    if first > max_call_s:
        return {"skipped": f"one call took {first:.1f} s > --max-call-seconds {max_call_s}", "out": out}
    warm = timed()
    repeats = int(min(100, max(5, 0.5 / max(warm, 1e-6)))) if warm < 1.0 else 3
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(begin.elapsed_time(end) / 1e3)
        else:
            times.append(timed())
    return {"latency_ms": statistics.median(times) * 1e3, "repeats": repeats, "out": out}


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30))


# ----------------------------------------------------------------------------- aqlm
def _numba_one_thread(fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Run `fn` with one numba thread: aqlm's kernel is only race-free (correct) that way."""
    import numba

    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        return fn()
    finally:
        numba.set_num_threads(before)


def aqlm_methods(qw: QuantizedWeight, device: torch.device, dtype: torch.dtype) -> dict[str, Callable]:
    """aqlm kernels applicable to this spec, as `x -> y` callables in aqlm's own layouts."""
    try:
        import aqlm  # noqa: F401
    except ImportError:
        return {}
    M, C, g = qw.spec.num_codebooks, qw.spec.codebook_size, qw.spec.group_size
    N = qw.out_features
    books = qw.codebooks.to(dtype).reshape(M, C, 1, g)  # aqlm: [M, C, out_group=1, in_group]
    scales = qw.scales.to(dtype).reshape(N, 1, 1, 1)
    signed = qw.codes.view(torch.int8) if C <= 256 else qw.codes.view(torch.int16)  # aqlm stores signed
    methods: dict[str, Callable] = {}
    if device.type == "cpu" and C == 256:
        try:
            from aqlm.inference_kernels.numba_kernel import numba_gemm_lut

            codes_alt = signed.permute(1, 0, 2).contiguous()  # aqlm's CPU layout [K/g, N, M]
            methods["aqlm_numba"] = lambda x: numba_gemm_lut(x, codes_alt, books, scales, None)
            methods["aqlm_numba_1thread"] = lambda x: _numba_one_thread(
                lambda: numba_gemm_lut(x, codes_alt, books, scales, None)
            )
        except ImportError:
            pass
    if device.type == "cuda" and g & (g - 1) == 0:
        try:
            from aqlm.inference_kernels.triton_kernel import triton_matmul

            methods["aqlm_triton"] = lambda x: triton_matmul(x, signed, books, scales, None)
        except Exception as exc:  # noqa: BLE001 - report, do not crash the benchmark
            print(f"aqlm triton kernel unavailable: {exc}", file=sys.stderr)
        op = {(1, 65536, 8): "code1x16_matmat", (2, 256, 8): "code2x8_matmat", (1, 256, 8): "code1x8_matmat"}
        name = op.get((M, C, g))
        if name is not None:
            try:
                from aqlm.inference_kernels import cuda_kernel  # noqa: F401 - compiles the extension

                kernel = getattr(torch.ops.aqlm, name)
                methods["aqlm_cuda"] = lambda x: kernel(x, signed, books, scales, None)
            except Exception as exc:  # noqa: BLE001
                print(f"aqlm CUDA kernel unavailable: {type(exc).__name__}: {exc}", file=sys.stderr)
    return methods


# ----------------------------------------------------------------------------- cases
class Budget:
    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds
        self.seconds = seconds

    def left(self) -> bool:
        return time.perf_counter() < self.end


def linear_rows(args, device: torch.device, budget: Budget) -> list[dict]:
    shapes = QUICK_LINEAR if args.quick else LINEAR_SHAPES
    specs = ["2x8g8"] if args.quick else args.specs
    rows_list = [1, 16] if args.quick else args.rows
    dense_dtype = torch.float16 if device.type == "cuda" else torch.float32
    out: list[dict] = []
    timed_dense: set[tuple[int, int, int]] = set()  # dense does not depend on the spec: time it once
    for family, (N, K) in shapes:
        for spec_name in specs:
            spec = QuantSpec.parse(spec_name)
            if K % spec.group_size:
                continue
            qw = random_qweight((N, K), spec, device)
            layer = AQLinear(qw).requires_grad_(False)
            W = qw.dequantize(dense_dtype)
            extra = aqlm_methods(qw, device, dense_dtype)
            common = {"op": "linear", "family": family, "N": N, "K": K, "dtype": str(dense_dtype)[6:]}
            quant = {
                "spec": spec.name,
                "weight_bytes": weight_bytes(qw),
                "dense_fp16_bytes": 2 * N * K,
                "total_bits": qw.total_bits,
            }
            for R in rows_list:
                x = torch.randn(R, K, device=device, dtype=dense_dtype)
                with torch.no_grad():
                    ref = x @ W.T  # the product every method must reproduce (same decoded weight)
                methods: dict[str, tuple[str | None, Callable]] = {
                    "dense": (None, lambda x=x, W=W: x @ W.T),
                    "dequant_gemm": ("dequant", lambda x=x, f=layer: f(x)),
                    "fused": ("triton" if device.type == "cuda" else "lut", lambda x=x, f=layer: f(x)),
                    "auto": (None, lambda x=x, f=layer: f(x)),
                }
                for name, fn in extra.items():
                    methods[name] = (None, lambda x=x, fn=fn: fn(x))
                lut_mib = R * K // spec.group_size * spec.num_codebooks * spec.codebook_size * 4 / 2**20
                for method, (kernel, fn) in methods.items():
                    if method == "dense":
                        if (N, K, R) in timed_dense:
                            continue
                        timed_dense.add((N, K, R))
                        row = {**common, "rows": R, "method": method, "spec": None}
                    else:
                        row = {**common, **quant, "rows": R, "method": method}
                    if method == "auto":  # the rule's guess; replaced by the measured choice after timing
                        row["kernel"] = choice.choose_linear_kernel(device, dense_dtype, R, spec, N)
                    reason = None
                    uses_lut = kernel == "lut" or row.get("kernel") == "lut"
                    if not budget.left():
                        reason = f"--max-seconds {budget.seconds:g} reached"
                    elif (uses_lut or method.startswith("aqlm_numba")) and lut_mib > args.max_lut_mib:
                        reason = f"LUT of {lut_mib:.0f} MiB > --max-lut-mib"
                    elif method.startswith("aqlm_numba") and R > 256:
                        reason = "aqlm's numba kernel runs one GEMV per row (rows x the 1-row latency)"
                    if reason is not None:
                        out.append({**row, "skipped": reason})
                        continue
                    try:
                        with torch.no_grad(), choice.forced_kernel(kernel):
                            timing = time_call(fn, device, args.max_call_seconds)
                    except Exception as exc:  # noqa: BLE001 - record and go on
                        out.append({**row, "skipped": f"{type(exc).__name__}: {str(exc)[:200]}"})
                        continue
                    y = timing.pop("out")
                    if method == "auto":
                        key = choice.measured_key(layer, x, R)
                        if key is not None:
                            row["kernel"] = autotune.chosen(key) or row["kernel"]
                            row["kernel_choice"] = "measured"
                    if "latency_ms" in timing:
                        timing["tflops"] = 2 * R * N * K / (timing["latency_ms"] * 1e-3) / 1e12
                    timing["rel_err"] = rel_err(y, ref)
                    out.append({**row, **timing})
                    print(_line(out[-1]), flush=True)
    return out


def conv_rows(args, device: torch.device, budget: Budget) -> list[dict]:
    shapes = QUICK_CONV if args.quick else CONV_SHAPES
    batches = [1] if args.quick else [1, 8]
    specs = ["2x8g8"] if args.quick else ["2x8g8", "2x8g9k"]
    dense_dtype = torch.float16 if device.type == "cuda" else torch.float32
    implicit = "triton" if device.type == "cuda" else "lut"  # the kernel of the implicit GEMM
    out: list[dict] = []
    for family, cout, cin, hw in shapes:
        for spec_name in specs:
            spec = QuantSpec.parse(spec_name)
            qw = random_qweight((cout, cin, 3, 3), spec, device)
            layer = AQConv2d(qw, padding=1).requires_grad_(False)
            W = qw.dequantize(dense_dtype)
            for B in batches:
                x = torch.randn(B, cin, hw, hw, device=device, dtype=dense_dtype)
                R = B * hw * hw
                methods = {
                    "dense": (None, lambda x=x, W=W: F.conv2d(x, W, None, 1, 1)),
                    "dequant_conv": ("dequant", lambda x=x, f=layer: f(x)),
                    "implicit": (implicit, lambda x=x, f=layer: f(x)),
                    "auto": (None, lambda x=x, f=layer: f(x)),
                }
                if device.type == "cpu" and fused.takes_conv(x, layer):  # the native decode-GEMM, as measured
                    run = dispatch._conv_runner("fused", layer, x)
                    methods["fused_conv"] = (None, lambda x=x, run=run: run(x))
                ref = None
                lut_mib = R * cin * 9 // spec.group_size * spec.num_codebooks * spec.codebook_size * 4 / 2**20
                for method, (kernel, fn) in methods.items():
                    row = {
                        "op": "conv",
                        "family": family,
                        "out": cout,
                        "in": cin,
                        "hw": hw,
                        "batch": B,
                        "rows": R,
                        "spec": spec.name,
                        "method": method,
                        "dtype": str(dense_dtype).removeprefix("torch."),
                    }
                    if not budget.left():
                        out.append({**row, "skipped": f"--max-seconds {budget.seconds:g} reached"})
                        continue
                    if kernel == "lut" and lut_mib > args.max_lut_mib:
                        out.append({**row, "skipped": f"LUT of {lut_mib:.0f} MiB > --max-lut-mib"})
                        continue
                    try:
                        with torch.no_grad(), choice.forced_kernel(kernel):
                            timing = time_call(fn, device, args.max_call_seconds)
                    except Exception as exc:  # noqa: BLE001
                        out.append({**row, "skipped": f"{type(exc).__name__}: {str(exc)[:200]}"})
                        continue
                    y = timing.pop("out")
                    ref = y if method == "dense" else ref
                    if "latency_ms" in timing:
                        timing["tflops"] = 2 * R * cout * cin * 9 / (timing["latency_ms"] * 1e-3) / 1e12
                    if ref is not None:
                        timing["rel_err"] = rel_err(y, ref)
                    out.append({**row, **timing})
                    print(_line(out[-1]), flush=True)
    return out


def _line(row: dict) -> str:
    shape = f"[{row['N']},{row['K']}]" if row["op"] == "linear" else f"{row['out']}x{row['in']}@{row['hw']}"
    figure = f"{row['latency_ms']:.3f} ms" if "latency_ms" in row else f"skipped ({row['skipped']})"
    err = f" rel_err={row['rel_err']:.1e}" if "rel_err" in row else ""
    kernel = f" -> {row['kernel']}" if "kernel" in row else ""
    head = (
        f"{row['op']} {row['family']} {shape} {row['spec'] or '-'} rows={row['rows']} {row['method']}{kernel}"
    )
    return f"{head}: {figure}{err}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few shapes, under a minute")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--specs", type=lambda s: s.split(","), default=SPECS)
    parser.add_argument("--rows", type=lambda s: [int(v) for v in s.split(",")], default=ROWS)
    parser.add_argument("--no-conv", action="store_true", help="skip the conv strategy rows")
    parser.add_argument("--max-seconds", type=float, default=3600.0, help="total timing budget")
    parser.add_argument("--max-call-seconds", type=float, default=5.0, help="skip slower single calls")
    parser.add_argument("--max-lut-mib", type=float, default=256.0, help="skip larger LUTs (CPU)")
    parser.add_argument("--results-dir", default=None, help="default: benchmarks/results")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.quick:
        args.max_seconds = min(args.max_seconds, 45.0)
    budget = Budget(args.max_seconds)
    # `auto` measures its CPU kernels on its first call of each shape, as in a fresh process on this host
    # (excluded from the timing, like compiles): a choice cache of this run, not the user's.
    with autotune.fresh_cache("avq-kernels-bench-"):
        rows = linear_rows(args, device, budget)
        if not args.no_conv:
            rows += conv_rows(args, device, budget)
    cpu_kernels = compiled.backend() if device.type == "cpu" else None  # native C, numba or None (torch)
    for row in rows:
        row["threads"] = torch.get_num_threads() if device.type == "cpu" else None
        row["cpu_kernels"] = cpu_kernels
    name = f"kernels_{device.type}" + ("_quick" if args.quick else "")
    path = write_results(name, rows, device=device, results_dir=args.results_dir)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
