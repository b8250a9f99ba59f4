"""Why the CPU LUT path is slower on one host than another: its parts and variants, timed on this host.

    python benchmarks/lut_variants.py                # -> benchmarks/results/lut_variants_cpu.json
    taskset -c 0,1 env OMP_NUM_THREADS=2 NUMBA_NUM_THREADS=2 python benchmarks/lut_variants.py

One `[4096, 4096]` `2x8g8` layer (the #21 acceptance shape), one input row, fp32, random codes. Rows
(`"part"`), each the median of repeats after a warm-up call, in one process and in this order:
- `dense`: `x @ W.T` with the decoded weight (torch's threads);
- `lut_build`: the LUT of one row (`[G, g] x [g, M*C]`, one small GEMM);
- `gather_sum`: the compiled gather-sum alone over a prebuilt LUT, per variant: `loop` is the shipped
  kernel (`avq.kernels.compiled._gather_sum_kernel`: a loop over the `J*M` lookups of a block, fastmath);
  `U<u><s|t>` are unrolled sources generated here (all `J*M` lookups of `u` outputs written out, summed in
  order `s` or as a tree `t`, no fastmath), for `J` groups per block, on one thread or on numba's threads
  (`threads`);
- `lut_matmul_codes`: the shipped LUT path end to end (what `AVQ_KERNEL=lut` runs);
- `embedding_bag`: the fallback LUT path (`lut_matmul` over the cached int32 index);
- `decode`: the compiled decode of the whole weight into a reused buffer, serial and parallel;
- `dequant_matmul`: the shipped blocked decode + GEMM, per decoded block size (`--dequant-block-mib`);
- `lut_over_dense`: the shipped LUT path per `J` over the dense GEMV, timed in interleaved rounds
  (`--rounds`): the median and range of the per-round ratios.
`rel_err` checks each against the dense product. The JSON's `device` names the CPU model and core count.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from avq.kernels import compiled, lut
from avq_bench.results import write_results

SIZE = 4096  # N = K: the acceptance shape
M, C, g = 2, 256, 8


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def unrolled_source(J: int, unroll: int, tree: bool) -> str:
    """A gather-sum for one (J, unroll, order): the same blocked layout and output split as the shipped
    kernel, with the `J*M` lookups of `unroll` consecutive outputs written out."""
    JM = J * M

    def total(var: str) -> str:
        terms = [f"lr[base + {k * C} + np.int64({var}[{k}])]" for k in range(JM)]
        while tree and len(terms) > 1:
            terms = [f"({' + '.join(terms[i : i + 2])})" for i in range(0, len(terms), 2)]
        return " + ".join(terms)

    lines = [
        "def gather_sum(lut, codes, out):",
        "    GB, N, _ = codes.shape",
        "    T = numba.get_num_threads()",
        "    chunk = (N + T - 1) // T",
        "    for t in numba.prange(T):",
        "        lo = t * chunk",
        "        hi = min(N, lo + chunk)",
        "        for r in range(lut.shape[0]):",
        "            lr = lut[r]",
        "            for b in range(GB):",
        f"                base = b * {JM * C}",
        "                cb = codes[b]",
        "                n = lo",
        f"                while n + {unroll} <= hi:",
    ]
    body = " " * 20
    for u in range(unroll):
        lines += [f"{body}c{u} = cb[n + {u}]", f"{body}out[r, n + {u}] += {total(f'c{u}')}"]
    lines += [f"{body}n += {unroll}", "                while n < hi:", f"{body}c0 = cb[n]"]
    lines += [f"{body}out[r, n] += {total('c0')}", f"{body}n += 1"]
    return "\n".join(lines) + "\n"


def compile_unrolled(J: int, unroll: int, tree: bool, parallel: bool) -> Callable:
    numba = compiled._numba()
    scope = {"np": np, "numba": numba}
    exec(compile(unrolled_source(J, unroll, tree), f"<gather_sum J={J} U={unroll}>", "exec"), scope)
    return numba.njit(parallel=parallel, cache=False, error_model="numpy")(scope["gather_sum"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--blocks", type=lambda s: [int(v) for v in s.split(",")], default=[4, 8, 16])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--size", type=int, default=SIZE, help="N = K of the layer (4096: the acceptance shape)"
    )
    parser.add_argument("--results-dir", default=None, help="default: benchmarks/results")
    parser.add_argument("--no-unrolled", action="store_true", help="only the shipped gather-sum per J")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds of dense vs the LUT path")
    parser.add_argument(
        "--dequant-block-mib", type=lambda s: [float(v) for v in s.split(",")], default=[0.5, 1, 2, 4, 8]
    )
    args = parser.parse_args(argv)
    numba = compiled._numba()
    if numba is None:
        sys.exit("lut_variants.py needs numba")
    threads = torch.get_num_threads()
    N = K = args.size
    gen = torch.Generator().manual_seed(args.seed)
    codes = torch.randint(0, C, (N, K // g, M), dtype=torch.uint8, generator=gen)  # [N, G, M]
    books = torch.randn(M, C, g, generator=gen)  # [M, C, g]
    scales = torch.rand(N, generator=gen) + 0.5  # [N]
    x = torch.randn(1, K, generator=gen)  # [1, K]
    weight = lut.dequantize(codes, books, scales)  # [N, K]
    ref = x @ weight.T  # [1, N]
    rows: list[dict] = []

    def record(part: str, ms: float, y: torch.Tensor | None = None, **extra) -> None:
        err = None if y is None else float((y.reshape(ref.shape) - ref).abs().max() / ref.abs().max())
        row = {"part": part, "ms": round(ms, 4), "rel_err": err, "torch_threads": threads, "size": N, **extra}
        rows.append(row)
        label = " ".join(f"{k}={v}" for k, v in extra.items())
        print(f"{part} {label}: {ms:.3f} ms" + ("" if err is None else f" rel_err={err:.1e}"), flush=True)

    record("dense", median_ms(lambda: x @ weight.T, args.repeats), x @ weight.T)
    build = lambda: (x.reshape(-1, g) @ books.reshape(M * C, g).T).reshape(1, -1)  # noqa: E731 - [1, G*M*C]
    record("lut_build", median_ms(build, args.repeats))
    table = build().numpy()
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    for J in args.blocks:
        blocked = compiled.blocked_codes(codes, J).numpy()  # [G/J, N, J*M]
        for parallel in (False, True):
            kernels = {"loop": compiled._gather_sum_kernel(M, C, J, parallel)}
            for unroll in () if args.no_unrolled else (1, 2, 4):
                for tree in (False, True):
                    kernels[f"U{unroll}{'t' if tree else 's'}"] = compile_unrolled(J, unroll, tree, parallel)
            for name, kernel in kernels.items():
                out = np.zeros((1, N), np.float32)
                kernel(table, blocked, out)  # compiles
                y = torch.from_numpy(out * scales.numpy())
                ms = median_ms(lambda k=kernel, o=out, c=blocked: (o.fill(0), k(table, c, o)), args.repeats)
                threads_used = numba.get_num_threads() if parallel else 1
                record("gather_sum", ms, y, variant=name, J=J, threads=threads_used)
    blocked = compiled.blocked_codes(codes)
    shipped = lambda: compiled.lut_matmul_codes(x, blocked, books, scales)  # noqa: E731
    record("lut_matmul_codes", median_ms(shipped, args.repeats), shipped(), J=compiled.NUMBA_GROUP_BLOCK)
    index = lut.lut_index(codes, C)
    record(
        "embedding_bag",
        median_ms(lambda: lut.lut_matmul(x, index, books, scales), args.repeats),
        lut.lut_matmul(x, index, books, scales),
        J=lut.LUT_GROUP_BLOCK,
    )
    buffer = torch.empty(N, K)
    flat = (codes.reshape(N, -1).numpy(), books.reshape(-1).numpy(), scales.numpy())
    for parallel in (False, True):
        kernel = compiled._decode_kernel(M, C, g, parallel)
        compiled._compile_for(kernel, *flat, buffer.numpy())
        ms = median_ms(lambda k=kernel: k(*flat, buffer.numpy()), args.repeats)
        record(
            "decode",
            ms,
            x @ buffer.T,
            threads=numba.get_num_threads() if parallel else 1,
            gb_per_s=round(N * K * 4 / ms / 1e6, 1),
        )
    shipped_block = lut.DEQUANT_BLOCK_BYTES
    for mib in args.dequant_block_mib:  # the decoded block the GEMM reads: which cache level holds it
        lut.DEQUANT_BLOCK_BYTES = int(mib * 2**20)
        blocked_gemm = lambda: lut.dequant_matmul(x, codes, books, scales)  # noqa: E731
        record("dequant_matmul", median_ms(blocked_gemm, args.repeats), blocked_gemm(), block_mib=mib)
    lut.DEQUANT_BLOCK_BYTES = shipped_block
    # Interleaved rounds: on a shared or virtual host the same call's time drifts between runs, so the
    # LUT path is read as a ratio to the dense GEMV timed beside it, round by round.
    paths = {J: compiled.blocked_codes(codes, J) for J in args.blocks}
    ratios: dict[int, list[float]] = {J: [] for J in args.blocks}
    for _ in range(args.rounds):
        dense_ms = median_ms(lambda: x @ weight.T, 10)
        for J, blocked_J in paths.items():
            ms = median_ms(lambda c=blocked_J: compiled.lut_matmul_codes(x, c, books, scales), 10)
            ratios[J].append(ms / dense_ms)
    for J, values in ratios.items():
        ratio, low, high = statistics.median(values), min(values), max(values)
        rows.append(
            {
                "part": "lut_over_dense",
                "J": J,
                "rounds": len(values),
                "ratio": ratio,
                "ratio_min": low,
                "ratio_max": high,
                "torch_threads": threads,
            }
        )
        print(f"lut_matmul_codes J={J} / dense: x{ratio:.2f} ({low:.2f}-{high:.2f})")
    path = write_results("lut_variants_cpu", rows, device="cpu", results_dir=args.results_dir)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
