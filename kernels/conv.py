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
(`choice.LUT_MAX_ROWS` = 4). Measured on 2 EPYC cores, 1280->1280 3x3 at 8x8, batch 1 (64 rows), 2x8g8:
dequantize + conv 31-40 ms, implicit GEMM through the LUT 174 ms, dense fp32 conv 24 ms. The CPU's
`"dequant"` family is measured per call (`choice.conv_candidates`) against a third way,
`kernels/fused.py`: the native decode-GEMM, which reads the input in place (padded) where it can and
multiplies by a weight decoded inside its inner loop, never written to memory.

Re-measuring: `python benchmarks/kernels.py` writes `"op": "conv"` rows timing `dequant_conv` and
`implicit` per shape and batch; set `GPU_IMPLICIT_MAX_ROWS` to the largest `rows` where `implicit` wins
on the target GPU (the current value is a first guess: no GPU was available when this was written).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

GPU_IMPLICIT_MAX_ROWS = 256  # set from benchmarks/kernels.py --conv on the target GPU
PATCH_TO_WEIGHT_MAX = 4.0  # skip implicit GEMM when the unfolded input dwarfs the weight it avoids


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


def unfold(
    x: torch.Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    pads: tuple[int, int, int, int],
    dilation: tuple[int, int],
) -> torch.Tensor:
    """`F.unfold`'s patches `[B, C*kh*kw, L]` under explicit `pads` (`explicit_padding`); uneven ones ("same"
    with an even kernel) go through `F.pad` first, since `F.unfold` pads both sides alike."""
    top, bottom, left, right = pads
    if top != bottom or left != right:
        x, top, left = F.pad(x, (left, right, top, bottom)), 0, 0
    return F.unfold(x, kernel_size, dilation=dilation, padding=(top, left), stride=stride)


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
        cols = unfold(x, kernel_size, stride, pads, dilation)
        cols = cols.transpose(1, 2).reshape(B * ho * wo, -1)  # [B*L, in*kh*kw]
    y = matmul(cols).view(B, ho, wo, -1).permute(0, 3, 1, 2)  # NCHW view of an NHWC result
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return y
    return y.contiguous()
