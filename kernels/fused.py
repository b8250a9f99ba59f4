"""The native fused decode-GEMM on CPU (`native.c`, "fused GEMM"): convolutions and Linears whose weight is
decoded inside the multiply and never written to memory.

Why: the "dequant" path writes the decoded weight (at ~12 GB/s once it outgrows L2) and the dense kernel
reads it back; at the small feature maps and token counts of a latent UNet at batch 1 that cost more than
the FP layer itself (digits-unet: 1.05-1.15x FP a step). The fused kernel reads each codebook row from L1
as a broadcast onto 6 output channels x 2 runs of 8 outputs on 12 vector accumulators (16 AVX2 registers),
so the weight costs one byte of codes per 4 weights (1x8g4) instead of 4 bytes written and 4 read.

The kernel reads its input at `x[run + koff[k] + i]` for `i < RUN`: each run is `RUN` outputs whose inputs
lie next to each other (one vector load per weight column). Where the outputs do not come in such runs the
kernel does not apply (no tail), and the dispatcher, which measures it against decode + dense per call
(`choice.conv_candidates`, `choice.linear_candidates`), keeps the other paths.

Sums in another order than decode + `F.conv2d`/`F.linear` and with FMAs: equal to them within float
rounding, not bit for bit (the decode paths are bit-identical to `avq.core.qweight.decode`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import compiled, native
from .conv import explicit_padding, output_size, unfold

RUN = 8  # outputs per run (one 256-bit vector of fp32)
PARALLEL_MIN = 1 << 18  # multiply-adds from which the kernel splits over torch's threads (~1 us to start)


def _applies(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32 and native.available()


# ----------------------------------------------------------------------------- convolutions
@functools.lru_cache(maxsize=128)
def conv_layout(
    x_shape: tuple[int, int, int, int],
    out_channels: int,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    pads: tuple[int, int, int, int],
    dilation: tuple[int, int],
) -> tuple[str, torch.Tensor, torch.Tensor, int] | None:
    """How the kernel reads a conv's input: `(layout, koff [K], runs [2, V], ostride)` (`runs`: each run's
    input and output offsets; `ostride`: output elements per channel), or None when the outputs do not come
    in runs of `RUN`. Layouts, cheapest first:

    - `"flat"`: a 1x1 stride-1 unpadded conv reads `x [B, C, H*W]` itself;
    - `"padded"`: stride 1 along the width and `RUN | Wo`: the input, zero-padded, read in place: a run is
      `RUN` output columns of one output row, column k = (c, kh, kw) sits at `c*Hp*Wp + kh*dh*Wp + kw*dw`
      from the run's corner (no 9x unfold);
    - `"unfold"`: anything else with `RUN | Ho*Wo` (e.g. 4x4 outputs): `F.unfold`'s `[B, K, L]`.

    Kept per geometry (layers of one shape share the offsets)."""
    B, C, H, W = x_shape
    (kh, kw), (sh, sw), (dh, dw) = kernel_size, stride, dilation
    top, bottom, left, right = pads
    ho, wo = output_size((H, W), kernel_size, stride, pads, dilation)
    L = ho * wo
    if ho <= 0 or wo <= 0:
        return None
    if (kh, kw, sh, sw) == (1, 1, 1, 1) and pads == (0, 0, 0, 0) and L % RUN == 0:
        layout, koff, x_batch, x_runs = "flat", torch.arange(C, dtype=torch.int64) * L, C * L, None
    elif sw == 1 and wo % RUN == 0:
        Hp, Wp = H + top + bottom, W + left + right
        c, i, j = torch.meshgrid(*(torch.arange(n, dtype=torch.int64) for n in (C, kh, kw)), indexing="ij")
        layout, koff, x_batch = "padded", (c * Hp * Wp + i * dh * Wp + j * dw).reshape(-1), C * Hp * Wp
        rows, cols = torch.meshgrid(torch.arange(ho) * sh * Wp, torch.arange(0, wo, RUN), indexing="ij")
        x_runs = (rows + cols).reshape(-1)
    elif L % RUN == 0:
        K = C * kh * kw
        layout, koff, x_batch, x_runs = "unfold", torch.arange(K, dtype=torch.int64) * L, K * L, None
    else:
        return None
    return layout, koff, _runs(B, x_batch, x_runs, out_channels * L, L), L


def _runs(batch: int, x_batch: int, x_runs: torch.Tensor | None, out_batch: int, L: int) -> torch.Tensor:
    """`[2, batch*L/RUN]`: the input and output offsets of every run, batch-major (`x_runs`: one sample's
    input offsets, None: the same as the outputs')."""
    batches = torch.arange(batch, dtype=torch.int64).view(batch, 1)
    out_runs = torch.arange(0, L, RUN, dtype=torch.int64)
    x_runs = out_runs if x_runs is None else x_runs
    x_at, out_at = batches * x_batch + x_runs, batches * out_batch + out_runs
    return torch.stack([x_at.reshape(-1), out_at.reshape(-1)])


def takes_conv(x: torch.Tensor, module) -> bool:
    """Whether `conv2d` takes this call of the `AQConv2d` `module`."""
    if not _applies(x) or x.dim() != 4:
        return False
    kernel_size = tuple(module.shape[2:])
    pads = explicit_padding(module.padding, kernel_size, module.dilation)
    geometry = (kernel_size, module.stride, pads, module.dilation)
    return conv_layout(tuple(x.shape), module.shape[0], *geometry) is not None


def conv2d(
    x: torch.Tensor,
    codes: torch.Tensor,
    books: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    shape: tuple[int, ...],
    stride: tuple[int, int],
    padding: tuple[int, int] | str,
    dilation: tuple[int, int],
    parallel: bool | None = None,
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """`conv2d(x, W)` for calls shaped like `x` (CPU fp32 NCHW), the weight `W` of `shape` decoded inside
    the multiply from `codes`, `books`, `scales` (fp32, as the dispatcher caches them); prepared once. None
    where it does not apply (no native kernels, another device or dtype, outputs not in runs of `RUN`).
    `parallel`: split over torch's threads (default: from `PARALLEL_MIN` multiply-adds)."""
    if not _applies(x) or x.dim() != 4:
        return None
    N, kernel_size = shape[0], tuple(shape[2:])
    pads = explicit_padding(padding, kernel_size, dilation)
    plan = conv_layout(tuple(x.shape), N, kernel_size, stride, pads, dilation)
    if plan is None:
        return None
    layout, koff, runs, L = plan
    kernel = _kernel(codes, books, scales, bias, koff, runs, L, parallel)
    if kernel is None:
        return None
    B, ho_wo = x.shape[0], output_size(tuple(x.shape[-2:]), kernel_size, stride, pads, dilation)
    top, bottom, left, right = pads
    pad = (left, right, top, bottom) if layout == "padded" and any(pads) else None  # read in place after

    def run(x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        if pad is not None:
            x = F.pad(x, pad)
        elif layout == "unfold":
            x = unfold(x, kernel_size, stride, pads, dilation)
        out = torch.empty(B, N, *ho_wo, dtype=torch.float32)
        kernel(x, out)
        return out

    return run


# ----------------------------------------------------------------------------- Linears
@functools.lru_cache(maxsize=128)
def linear_layout(rows: int, K: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`(koff [K], runs [2, padded/RUN])` of a Linear over `rows` rows, read from the transposed input
    `[K, padded]` into the transposed output `[N, padded]`, `padded`: `rows` rounded up to a multiple of
    `RUN` (e.g. 77 text tokens: 3 zero rows more, dropped from the output); None below `RUN` rows, where the
    padding would be most of the work (the LUT serves those)."""
    if rows < RUN:
        return None
    padded = -(-rows // RUN) * RUN
    return torch.arange(K, dtype=torch.int64) * padded, _runs(1, 0, None, 0, padded)


def takes_linear(x: torch.Tensor, K: int) -> bool:
    """Whether `linear` takes a call with input `x [..., K]`."""
    return _applies(x) and x.dim() >= 1 and linear_layout(x.numel() // K if K else 0, K) is not None


def linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    books: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    parallel: bool | None = None,
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """`F.linear(x, W)` for calls shaped like `x` (CPU fp32 `[..., K]`), `W` decoded inside the multiply;
    prepared once. The input is transposed into `[K, padded]` (the kernel's runs are 8 consecutive rows;
    rows past `rows` are zeros: any value would do, the outputs are dropped, but garbage can be slow
    denormals) and the output back, both by the native transpose (`native.c`): two copies of a few KiB at
    the token counts where this wins. None where it does not apply."""
    N, K = codes.shape[0], codes.shape[1] * books.shape[-1]
    if not takes_linear(x, K):
        return None
    rows = x.numel() // K
    koff, runs = linear_layout(rows, K)
    padded = runs.shape[1] * RUN
    kernel = _kernel(codes, books, scales, bias, koff, runs, padded, parallel)
    to_kernel = native.transpose(rows, K, K, padded, padded)  # x [rows, K] -> [K, padded]
    from_kernel = native.transpose(N, rows, padded, N, N)  # out [N, padded] -> [rows, N]
    if kernel is None or to_kernel is None or from_kernel is None:
        return None
    lead = tuple(x.shape[:-1])

    def run(x: torch.Tensor) -> torch.Tensor:
        xt = torch.empty(K, padded, dtype=torch.float32)
        to_kernel(x.reshape(rows, K).contiguous(), xt)
        out = torch.empty(N, padded, dtype=torch.float32)
        kernel(xt, out)
        y = torch.empty(*lead, N, dtype=torch.float32)
        from_kernel(out, y)
        return y

    return run


def _kernel(codes, books, scales, bias, koff, runs, ostride: int, parallel: bool | None):
    work = codes.shape[0] * codes.shape[1] * books.shape[-1] * runs.shape[1] * RUN
    parallel = compiled.use_threads(work, PARALLEL_MIN, parallel)
    return native.fused(codes, books, scales, bias, koff, runs, ostride, parallel)
