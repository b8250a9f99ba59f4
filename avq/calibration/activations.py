"""8-bit activations: fake quantization of quantized layers' inputs, ranges calibrated over timesteps, and
shortcut splitting at the skip concatenations of UNet up blocks (Q-Diffusion).

Why split: a UNet up block's ResNet sees `cat([h, skip], dim=1)`, and the two halves come from different
places (the decoder path and an encoder block) with ranges that differ several-fold; one 8-bit grid over
both wastes most of its levels on the wider half. `shortcut_splits` finds, for every layer that reads such
a concatenation (`conv1` after GroupNorm+SiLU, which keeps channels in place, and the 1x1
`conv_shortcut`), the channel where the skip half starts; `ActQuantizer` then keeps one range per segment.

Ranges: `RangeObserver` sees a layer's inputs at the calibration timesteps (the same FP sampling trajectory
that feeds the Hessians, `avq.calibration.calibrate(observers=...)`), keeps per segment the exact min/max
and a uniform random sample of values, and `ranges()` picks per segment the clipping of [min, max] that
minimises the mean squared quantization error on that sample: plain min/max lets one outlier timestep set
the step size for all of them.

The quantizer is attached with `attach_input_quantizer` as the submodule `input_quantizer` of a layer (an
`AQLinear`/`AQConv2d`, a packed `UniformLinear`/`UniformConv2d` of gptq/rtn, or a dense layer) plus a
forward pre-hook, so its ranges are in the layer's state dict (`<layer>.input_quantizer.lo/hi`) and saved
with it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn as nn

QUANTIZER_ATTR = "input_quantizer"
_CLIP_GRID = torch.linspace(1.0, 0.3, 36)  # fractions of [min, max] tried by `RangeObserver.ranges`


class ActQuantizer(nn.Module):
    """Asymmetric uniform fake quantization with one range per channel segment.

    `channels` split at `splits` (increasing, inside (0, channels)) into segments; buffers `lo`, `hi`
    `[S]` are each segment's range. `channel_dim` is 1 for conv inputs `[N, C, H, W]` and -1 for Linear
    inputs `[..., C]`. Gradients pass straight through (fine-tuning trains around a fixed quantizer).
    """

    def __init__(self, channels: int, bits: int = 8, splits: Sequence[int] = (), channel_dim: int = -1):
        super().__init__()
        if not 2 <= bits <= 16:
            raise ValueError(f"ActQuantizer: bits must be in 2..16, got {bits}")
        bounds = [0, *[int(s) for s in splits], int(channels)]
        if any(b >= c for b, c in itertools.pairwise(bounds)):
            raise ValueError(f"ActQuantizer: splits {list(splits)} must increase inside (0, {channels})")
        if channel_dim not in (1, -1):
            raise ValueError(f"ActQuantizer: channel_dim must be 1 or -1, got {channel_dim}")
        self.channels, self.bits, self.channel_dim = int(channels), int(bits), channel_dim
        self.splits = tuple(bounds[1:-1])
        self.register_buffer("lo", torch.zeros(len(bounds) - 1))
        self.register_buffer("hi", torch.ones(len(bounds) - 1))

    @property
    def segment_sizes(self) -> list[int]:
        bounds = [0, *self.splits, self.channels]
        return [b - a for a, b in itertools.pairwise(bounds)]

    def set_ranges(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        lo, hi = torch.as_tensor(lo, dtype=torch.float32), torch.as_tensor(hi, dtype=torch.float32)
        if lo.shape != self.lo.shape or hi.shape != self.hi.shape:
            raise ValueError(f"ActQuantizer: ranges must have shape {list(self.lo.shape)}")
        if not (torch.isfinite(lo).all() and torch.isfinite(hi).all() and (hi >= lo).all()):
            raise ValueError("ActQuantizer: ranges must be finite with hi >= lo")
        self.lo.copy_(lo)
        self.hi.copy_(hi)

    def _per_channel(self, values: torch.Tensor, ndim: int) -> torch.Tensor:
        """`[S]` -> broadcastable over the input: `[C]` along `channel_dim`."""
        if len(self.splits):
            sizes = torch.tensor(self.segment_sizes, device=values.device)
            values = values.repeat_interleave(sizes)
        if self.channel_dim == 1 and ndim > 2:
            return values.reshape(-1, *([1] * (ndim - 2)))
        return values

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[self.channel_dim] != self.channels:
            raise ValueError(
                f"ActQuantizer: input has {x.shape[self.channel_dim]} channels at dim {self.channel_dim}, "
                f"expected {self.channels}"
            )
        xq = self._fake_quantize(x.detach())
        if not (torch.is_grad_enabled() and x.requires_grad):
            return xq
        return x + (xq - x).detach()  # straight-through

    def _fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """`x` rounded to its segment's grid of `2^bits` levels over `[lo, hi]` (no autograd).

        `clamp(round(x / s) + z, 0, qmax) - z == clamp(round(x / s), -z, qmax - z)`: four in-place passes
        (faster on CPU than torch's fused fake-quantize op, which also builds a gradient mask).
        """
        qmax = (1 << self.bits) - 1
        scale = ((self.hi - self.lo).float() / qmax).clamp_min(1e-8)  # [S]
        zero = torch.round(-self.lo.float() / scale)  # [S]
        scale, zero = self._per_channel(scale, x.ndim), self._per_channel(zero, x.ndim)
        y = torch.div(x.float(), scale)
        y.round_()
        if not self.splits and zero.device.type == "cpu":
            y.clamp_(float(-zero), float(qmax - zero))  # scalar bounds: ~10x faster than tensor ones on CPU
        else:
            y.clamp_(-zero, qmax - zero)  # tensor bounds: no host sync on GPUs
        return y.mul_(scale).to(x.dtype)

    def to_entry(self) -> dict:
        """The JSON description stored in `quantization_config` (ranges go to the safetensors file)."""
        return {
            "bits": self.bits,
            "channels": self.channels,
            "splits": list(self.splits),
            "channel_dim": self.channel_dim,
        }

    @classmethod
    def from_entry(cls, entry: dict) -> ActQuantizer:
        return cls(entry["channels"], entry["bits"], entry.get("splits", ()), entry["channel_dim"])

    def extra_repr(self) -> str:
        return f"channels={self.channels}, bits={self.bits}, splits={list(self.splits)}"


class RangeObserver:
    """Streams a layer's inputs: per segment the exact min/max and up to `per_call` random values per call.

    Deterministic for `seed`. Memory: `per_call` floats per segment per observed forward.
    """

    def __init__(
        self,
        channels: int,
        splits: Sequence[int] = (),
        channel_dim: int = -1,
        per_call: int = 2048,
        seed: int = 0,
    ):
        self.quantizer_args = dict(channels=channels, splits=tuple(splits), channel_dim=channel_dim)
        bounds = [0, *splits, channels]
        self.bounds = list(itertools.pairwise(bounds))
        self.channel_dim = channel_dim
        self.per_call = per_call
        self.generator = torch.Generator().manual_seed(seed)
        self.mins = [float("inf")] * len(self.bounds)
        self.maxs = [float("-inf")] * len(self.bounds)
        self.samples: list[list[torch.Tensor]] = [[] for _ in self.bounds]

    @property
    def count(self) -> int:
        return len(self.samples[0])

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().float().cpu()
        x = x.movedim(1, -1) if self.channel_dim == 1 and x.ndim > 2 else x
        flat = x.reshape(-1, x.shape[-1])  # [rows, C]
        for s, (a, b) in enumerate(self.bounds):
            seg = flat[:, a:b].reshape(-1)
            self.mins[s] = min(self.mins[s], float(seg.min()))
            self.maxs[s] = max(self.maxs[s], float(seg.max()))
            if seg.numel() > self.per_call:
                seg = seg[torch.randint(seg.numel(), (self.per_call,), generator=self.generator)]
            self.samples[s].append(seg.clone())

    def ranges(self, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
        """Per segment `(lo [S], hi [S])`: the clipped [min, max] of lowest MSE on the sampled values."""
        if not self.count:
            raise ValueError("RangeObserver: no input observed")
        qmax = (1 << bits) - 1
        los, his = [], []
        for s in range(len(self.bounds)):
            values = torch.cat(self.samples[s])  # [n]
            lo0, hi0 = min(self.mins[s], 0.0), max(self.maxs[s], 0.0)  # the grid always holds 0
            lo_c, hi_c = lo0 * _CLIP_GRID, hi0 * _CLIP_GRID  # [T]
            scale = ((hi_c - lo_c) / qmax).clamp_min(1e-8)[:, None]  # [T, 1]
            zero = torch.round(-lo_c[:, None] / scale)
            q = torch.clamp(torch.round(values[None] / scale) + zero, 0, qmax)
            err = ((q - zero) * scale - values[None]).pow(2).mean(dim=1)  # [T]
            best = int(torch.argmin(err))
            los.append(float(lo_c[best]))
            his.append(float(hi_c[best]))
        return torch.tensor(los), torch.tensor(his)

    def quantizer(self, bits: int = 8) -> ActQuantizer:
        quantizer = ActQuantizer(bits=bits, **self.quantizer_args)
        quantizer.set_ranges(*self.ranges(bits))
        return quantizer


def channel_dim_of(layer: nn.Module) -> int:
    """Where the channels of `layer`'s input are: 1 for convs, -1 for Linear."""
    return 1 if isinstance(layer, nn.Conv2d) or getattr(layer, "_ndim", 2) == 4 else -1


def in_channels_of(layer: nn.Module) -> int:
    if isinstance(layer, nn.Conv2d):
        return layer.in_channels
    if isinstance(layer, nn.Linear):
        return layer.in_features
    return int(layer.shape[1])  # AQModule


def _quantize_input_hook(module: nn.Module, args: tuple) -> tuple:
    return (getattr(module, QUANTIZER_ATTR)(args[0]), *args[1:])


def attach_input_quantizer(layer: nn.Module, quantizer: ActQuantizer) -> None:
    """Quantize `layer`'s input with `quantizer` from now on (replaces an earlier one)."""
    if in_channels_of(layer) != quantizer.channels:
        raise ValueError(
            f"attach_input_quantizer: quantizer for {quantizer.channels} channels on a layer with "
            f"{in_channels_of(layer)} input channels"
        )
    had = getattr(layer, QUANTIZER_ATTR, None) is not None
    # the layer's device: a packed uniform layer without bias has buffers only
    device = next(itertools.chain(layer.parameters(), layer.buffers())).device
    setattr(layer, QUANTIZER_ATTR, quantizer.to(device))
    if not had:
        layer.register_forward_pre_hook(_quantize_input_hook)


def input_quantizers(model: nn.Module) -> dict[str, ActQuantizer]:
    """`{layer name: its ActQuantizer}` for every layer of `model` with an attached input quantizer."""
    suffix = f".{QUANTIZER_ATTR}"
    return {
        name[: -len(suffix)]: module
        for name, module in model.named_modules()
        if isinstance(module, ActQuantizer) and name.endswith(suffix)
    }


def shortcut_splits(model: nn.Module) -> dict[str, int]:
    """`{layer name: channel where the skip half of its input starts}` for the layers of a diffusers
    UNet's up blocks that read `cat([h, skip], dim=1)`; empty for models without skip concatenations.

    The decoder half `h` of up block j's resnet i comes from resnet i-1 (i > 0), else from the previous up
    block (j > 0), else from the mid block (or the last down block when there is none).
    """
    up_blocks = getattr(model, "up_blocks", None)
    if up_blocks is None:
        return {}
    if getattr(model, "mid_block", None) is not None:
        channels = model.mid_block.resnets[-1].out_channels
    else:
        channels = model.down_blocks[-1].resnets[-1].out_channels
    splits: dict[str, int] = {}
    for j, block in enumerate(up_blocks):
        for i, resnet in enumerate(getattr(block, "resnets", [])):
            for attr in ("conv1", "conv_shortcut"):
                layer = getattr(resnet, attr, None)
                if isinstance(layer, nn.Module) and in_channels_of(layer) > channels:
                    splits[f"up_blocks.{j}.resnets.{i}.{attr}"] = channels
            channels = resnet.out_channels
    return splits
