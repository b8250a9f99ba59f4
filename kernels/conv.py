"""Convolutions of `AQConv2d` as GEMMs: implicit GEMM over unfolded input, or dequantize + `F.conv2d`.

Two strategies, chosen per call by `choose_conv_strategy` (used by `kernels/dispatch.py`):

- `"implicit"`: unfold the input into `[B*Ho*Wo, in*kh*kw]` patches (`F.unfold` order, the order of K
  in the `[out, K]` weight view; a 1x1/stride-1 conv needs only a channels-last view) and run the fused
  VQ-GEMM (Triton on CUDA, the LUT on CPU) on it. The weight is never materialised, but the patches are
  `kh*kw` times the input.
- `"dequant"`: decode the weight into a reused workspace and call `F.conv2d` (cuDNN / oneDNN).

Rule (`choose_conv_strategy`): CUDA uses `"implicit"` when `rows = B*Ho*Wo <= GPU_IMPLICIT_MAX_ROWS` and
the patches are not much larger than the weight; everything else uses `"dequant"`. On CPU never the LUT:
UNet convs have at least 16 rows (a 4x4 feature map, one image), far above its break-even
(`dispatch.LUT_MAX_ROWS` = 4). Measured on 2 EPYC cores, 1280->1280 3x3 at 8x8, batch 1 (64 rows), 2x8g8:
dequantize + conv 31-40 ms, implicit GEMM through the LUT 174 ms, dense fp32 conv 24 ms. The CPU's
`"dequant"` family is measured per call (`dispatch.conv_candidates`) against a third way, `fused_conv`
below: the native decode-GEMM, which reads the input in place (padded) where it can and multiplies by a
weight decoded inside its inner loop, never written to memory.

Re-measuring: `python benchmarks/kernels.py` writes `"op": "conv"` rows timing `dequant_conv` and
`implicit` per shape and batch; set `GPU_IMPLICIT_MAX_ROWS` to the largest `rows` where `implicit` wins
on the target GPU (the current value is a first guess: no GPU was available when this was written).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import compiled, native

GPU_IMPLICIT_MAX_ROWS = 256  # set from benchmarks/kernels.py --conv on the target GPU
PATCH_TO_WEIGHT_MAX = 4.0  # skip implicit GEMM when the unfolded input dwarfs the weight it avoids
RUN = 8  # output positions per run of the native fused kernel (one 256-bit vector of fp32)
FUSED_PARALLEL_MIN = 1 << 22  # multiply-adds from which the fused kernel splits over torch's threads


def output_size(
    x_hw: tuple[int, int],
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int, int, int],
    dilation: tuple[int, int],
) -> tuple[int, int]:
    """Spatial output size; `padding` is explicit `(top, bottom, left, right)`."""
    (h, w), (kh, kw), (sh, sw), (dh, dw) = x_hw, kernel_size, stride, dilation
    top, bottom, left, right = padding
    ho = (h + top + bottom - dh * (kh - 1) - 1) // sh + 1
    wo = (w + left + right - dw * (kw - 1) - 1) // sw + 1
    return ho, wo


def explicit_padding(
    padding: tuple[int, int] | str, kernel_size: tuple[int, int], dilation: tuple[int, int]
) -> tuple[int, int, int, int]:
    """`(top, bottom, left, right)` for int pairs, `"valid"` and `"same"` (extra pad at the end, as torch)."""
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        pads = []
        for k, d in zip(kernel_size, dilation, strict=True):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return tuple(pads)  # type: ignore[return-value]
    ph, pw = padding
    return (ph, ph, pw, pw)


def rows_of(
    x: torch.Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int] | str,
    dilation: tuple[int, int],
) -> int:
    """GEMM rows of this convolution: `B * Ho * Wo`."""
    pads = explicit_padding(padding, kernel_size, dilation)
    ho, wo = output_size(tuple(x.shape[-2:]), kernel_size, stride, pads, dilation)
    return x.shape[0] * max(ho, 0) * max(wo, 0)


def choose_conv_strategy(device: torch.device, rows: int, out: int) -> str:
    """`"implicit"` or `"dequant"` for a conv with `rows` GEMM rows (see the module docstring)."""
    if device.type != "cuda" or rows > GPU_IMPLICIT_MAX_ROWS:
        return "dequant"
    # Patches hold rows*in*kh*kw values, the weight out*in*kh*kw: ratio rows/out.
    return "implicit" if rows <= PATCH_TO_WEIGHT_MAX * out else "dequant"


def implicit_gemm(
    x: torch.Tensor,
    matmul: Callable[[torch.Tensor], torch.Tensor],
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int] | str,
    dilation: tuple[int, int],
) -> torch.Tensor:
    """`conv2d(x, W)` as `matmul(patches) -> [B*Ho*Wo, out]`; `matmul` closes over the quantized weight
    (and bias). Returns NCHW; channels-last strided when `x` is channels-last (no copy back)."""
    B, Cin, H, W = x.shape
    pads = explicit_padding(padding, kernel_size, dilation)
    ho, wo = output_size((H, W), kernel_size, stride, pads, dilation)
    if kernel_size == (1, 1) and stride == (1, 1) and pads == (0, 0, 0, 0):
        cols = x.permute(0, 2, 3, 1).reshape(B * H * W, Cin)  # a view for channels-last input
    else:
        top, bottom, left, right = pads
        if top != bottom or left != right:  # "same" with an even kernel: F.unfold pads symmetrically only
            x = F.pad(x, (left, right, top, bottom))
            pads = (0, 0, 0, 0)
        cols = F.unfold(x, kernel_size, dilation=dilation, padding=(pads[0], pads[2]), stride=stride)
        cols = cols.transpose(1, 2).reshape(B * ho * wo, -1)  # [B*L, in*kh*kw]
    y = matmul(cols).view(B, ho, wo, -1).permute(0, 3, 1, 2)  # NCHW view of an NHWC result
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return y
    return y.contiguous()


# ----------------------------------------------------------------------------- fused (native, CPU)
@functools.lru_cache(maxsize=128)
def fused_layout(
    x_shape: tuple[int, int, int, int],
    out_channels: int,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    pads: tuple[int, int, int, int],
    dilation: tuple[int, int],
) -> tuple[str, torch.Tensor, torch.Tensor, int] | None:
    """How the native fused kernel reads a conv's input: `(layout, koff [K], runs [2, V], ostride)`, or None
    when the outputs do not come in runs of `RUN` (the kernel has no tail). Layouts, cheapest first:

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
    batches = torch.arange(B, dtype=torch.int64).view(B, 1)
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
    out_runs = torch.arange(0, L, RUN, dtype=torch.int64)
    x_runs = out_runs if x_runs is None else x_runs
    runs = torch.stack(
        [(batches * x_batch + x_runs).reshape(-1), (batches * out_channels * L + out_runs).reshape(-1)]
    )
    return layout, koff, runs, L


def fused_takes(x: torch.Tensor, module) -> bool:
    """Whether `fused_conv` takes this call of the `AQConv2d` `module`."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 4 or not native.available():
        return False
    kernel_size = tuple(module.shape[2:])
    pads = explicit_padding(module.padding, kernel_size, module.dilation)
    geometry = (kernel_size, module.stride, pads, module.dilation)
    return fused_layout(tuple(x.shape), module.shape[0], *geometry) is not None


def fused_conv(
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
    """`conv2d(x, W)` for calls shaped like `x` (CPU fp32 NCHW) through the native fused decode-GEMM, the
    weight `W` of `shape` decoded inside the multiply from `codes`, `books`, `scales` (fp32, as the
    dispatcher caches them); prepared once. None where it does not apply (no native kernels, another
    device or dtype, outputs not in runs of `RUN`). `parallel`: split over torch's threads (default: from
    `FUSED_PARALLEL_MIN` multiply-adds)."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 4 or not native.available():
        return None
    N, kernel_size = shape[0], tuple(shape[2:])
    pads = explicit_padding(padding, kernel_size, dilation)
    plan = fused_layout(tuple(x.shape), N, kernel_size, stride, pads, dilation)
    if plan is None:
        return None
    layout, koff, runs, L = plan
    work = N * codes.shape[1] * books.shape[-1] * runs.shape[1] * RUN
    parallel = compiled.use_threads(work, FUSED_PARALLEL_MIN, parallel)
    kernel = native.fused(codes, books, scales, bias, koff, runs, L, parallel)
    if kernel is None:
        return None
    B, ho_wo = x.shape[0], output_size(tuple(x.shape[-2:]), kernel_size, stride, pads, dilation)
    top, bottom, left, right = pads
    # F.pad first where the layout reads a padded input, or where F.unfold cannot pad ("same" with an even
    # kernel pads more at the end)
    pre_pad = (left, right, top, bottom) if layout == "padded" or top != bottom or left != right else None
    unfold_pad = (0, 0) if pre_pad else (top, left)

    def run(x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        if pre_pad is not None and any(pre_pad):
            x = F.pad(x, pre_pad)
        if layout == "unfold":
            x = F.unfold(x, kernel_size, dilation=dilation, padding=unfold_pad, stride=stride)
        out = torch.empty(B, N, *ho_wo, dtype=torch.float32)
        kernel(x, out)
        return out

    return run
