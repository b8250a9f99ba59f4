"""`HessianAccumulator`: streams one layer's input Hessian `H = E[x x^T]` from forward hooks."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class HessianAccumulator:
    """Streams `H = E[x x^T]` of one layer's inputs without keeping the activations.

    Linear inputs contribute each token (all leading dims flattened); Conv2d inputs contribute every
    unfolded patch, in the `F.unfold` order that matches a `[out, in*kh*kw]` weight.

    `max_rows`: per call, keep a uniform random subset of at most this many rows (drawn from a generator
    seeded with `seed`, so deterministic). `H` stays an unbiased estimate; the cost, `rows * K^2` per call,
    is what dominates calibration of high-resolution convs (a 16x16 conv with K = 2304 sees 8192 highly
    correlated patch rows per batch of 32).
    """

    def __init__(
        self,
        layer: nn.Module,
        *,
        max_rows: int | None = None,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ):
        if isinstance(layer, nn.Linear):
            K = layer.in_features
        elif isinstance(layer, nn.Conv2d):
            if layer.groups != 1:
                raise ValueError("HessianAccumulator: grouped convolutions (groups > 1) are not supported")
            if layer.padding_mode != "zeros":
                raise ValueError(
                    f"HessianAccumulator: padding_mode={layer.padding_mode!r} is not supported (only 'zeros')"
                )
            K = layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]
        else:
            raise TypeError(
                f"HessianAccumulator supports nn.Linear and nn.Conv2d, got {type(layer).__name__}"
            )
        self.layer = layer
        self.padding = _explicit_padding(layer) if isinstance(layer, nn.Conv2d) else 0
        # Accumulated on the compute device (the layer's): no host round trip per batch. float32 by default:
        # half the memory of float64 (26 GiB instead of 52 for SD 1.5), and against a float64 sum of the
        # same calibration (digits-unet, defaults) the difference is <= 3.7e-6 relative (Frobenius) and
        # <= 6.8e-6 of the mean diagonal, under the smallest damping the solver adds (1e-5); an AQ solve
        # on it moved by 0.1 % (`benchmarks/results/hessian_precision.json`). float64 is the reference.
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"HessianAccumulator: dtype must be float32 or float64, got {dtype}")
        self.sum = torch.zeros(K, K, dtype=dtype, device=layer.weight.device)
        self.count = 0
        if max_rows is not None and max_rows < 1:
            raise ValueError(f"HessianAccumulator: max_rows must be >= 1 or None, got {max_rows}")
        self.max_rows = max_rows
        self.generator = torch.Generator().manual_seed(seed)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        if isinstance(layer, nn.Linear):
            return x.reshape(-1, x.shape[-1])
        patches = F.unfold(
            x, layer.kernel_size, dilation=layer.dilation, padding=self.padding, stride=layer.stride
        )  # [N, K, L]
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        # The batch's Gram matrix in float32 (float64 GEMMs are ~2x slower on CPUs and far slower on GPUs;
        # one batch's rounding error, ~1e-6 relative, is far below the damping), added in place to the sum.
        rows = self._rows(x.detach()).float()  # [n, K]
        if self.max_rows is not None and rows.shape[0] > self.max_rows:
            keep = torch.randperm(rows.shape[0], generator=self.generator)[: self.max_rows]
            rows = rows[keep.to(rows.device)]
        rows = rows.to(self.sum.device)
        if self.sum.dtype == torch.float32:
            self.sum.addmm_(rows.T, rows)  # no [K, K] temporary
        else:
            self.sum += (rows.T @ rows).double()
        self.count += rows.shape[0]

    def hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self.add(inputs[0])

    @property
    def hessian(self) -> torch.Tensor:
        """`H` as float32, in a new buffer (the sum is kept: more inputs may follow)."""
        if self.count == 0:
            raise RuntimeError("no inputs were recorded for this layer")
        return (self.sum / self.count).to(torch.float32)

    def take(self) -> torch.Tensor:
        """`H` as float32, made in place from the float32 sum (no second `[K, K]` buffer); the accumulator
        is spent."""
        if self.count == 0:
            raise RuntimeError("no inputs were recorded for this layer")
        if self.sum is None:
            raise RuntimeError("HessianAccumulator.take: already taken")
        H, self.sum = self.sum, None
        return H.div_(self.count).to(torch.float32)


def _explicit_padding(conv: nn.Conv2d) -> tuple[int, int]:
    """`F.unfold` takes numbers only: resolve `padding="valid"|"same"` as `F.conv2d` applies it."""
    if not isinstance(conv.padding, str):
        return tuple(conv.padding)
    if conv.padding == "valid":
        return (0, 0)
    total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
    if any(t % 2 for t in total):
        raise ValueError(
            "HessianAccumulator: padding='same' with an even kernel pads asymmetrically; not supported"
        )
    return (total[0] // 2, total[1] // 2)
