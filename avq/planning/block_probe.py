"""LAQ's probe within a layer's block: a layer's effect on the model output from a forward of its block alone.

The whole-model probe (`avq.planning.sensitivity.Probe`) runs the whole denoiser at each kept timestep for
every layer. On a transformer that is most of what LAQ costs: SD3-medium's 24 blocks of ~14 layers each took
~65 s of probing per layer on 2 cores against 4-30 s for the layer's candidate solves
(`benchmarks/results/scale_sd3_cpu.json`). Here a layer of a top-level block (`block_of`: `down_blocks.1`,
`transformer_blocks.7`, `mid_block`, ...) is measured on its block only:

- the FP block's inputs (positional and keyword arguments) and outputs are recorded at the probe's inputs,
  one block at a time (the forward stops at that block: it costs the part of a forward up to it);
- the block's relative output error with the layer quantized costs one forward of the block;
- the first layer measured in a block (its anchor) is also probed on the whole model, which gives the block's
  gain, model-output error per unit of block-output error, and every other layer of the block gets
  `gain x block error`. How far a block's output error travels to the model output does not depend on which
  of the block's layers caused it to first order, so the anchor's gain stands for the block's
  (`benchmarks/laq_measure.py` checks the resulting choice against the whole-model measure).

Layers outside any block (`conv_in`, a time embedding's layers where they are the block's only layer) are
probed on the whole model. Assumes a block is called once per model forward (true of diffusers' denoisers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from avq.calibration.statistics import block_of
from avq.core.modules import replace_module
from avq.planning.sensitivity import SwapProbe, relative_mse


class _Recorded(Exception):
    """Raised by the recording hook once the block has run: the rest of the forward is not needed."""


def _tensors(output: Any) -> list[torch.Tensor]:
    """The tensors of a block's output (a tensor, or nested tuples/lists of tensors and None), in order."""
    if isinstance(output, torch.Tensor):
        return [output.float()]
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _tensors(item)]
    if hasattr(output, "to_tuple"):  # a diffusers/transformers output dataclass
        return _tensors(output.to_tuple())
    return []


@torch.no_grad()
def record_block(model: nn.Module, probe: SwapProbe, block: str) -> list[tuple[tuple, dict, Any]]:
    """`(args, kwargs, output)` of `block` at each of `probe`'s inputs, as the FP model runs it; each forward
    stops right after the block, so recording costs the part of a forward up to it."""
    calls: list[tuple[tuple, dict, Any]] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        calls.append((args, kwargs, output))
        raise _Recorded

    handle = model.get_submodule(block).register_forward_hook(hook, with_kwargs=True)
    try:
        for i in range(probe.num_inputs):
            try:
                probe.forward_input(model, i)
            except _Recorded:
                continue
            raise RuntimeError(f"LAQ probe: block {block!r} did not run in the model's forward")
    finally:
        handle.remove()
    return calls


@dataclass
class BlockProbe:
    """`probe`'s inputs and reference, measured within each layer's block (module docstring).

    `gains[block]`: the anchor's whole-model error over its block-output error; `anchors[block]`: its layer.
    """

    probe: SwapProbe
    gains: dict[str, float] = field(default_factory=dict)
    anchors: dict[str, str] = field(default_factory=dict)
    _block: str | None = None  # the block whose FP inputs and outputs are recorded
    _calls: list[tuple[tuple, dict]] = field(default_factory=list)  # its (args, kwargs) per probe input
    _reference: list[list[torch.Tensor]] = field(default_factory=list)  # its FP output tensors per input

    def layer_error(self, model: nn.Module, name: str, module: nn.Module) -> float:
        """The model's relative output error with layer `name` replaced by `module` (restored after)."""
        block = block_of(name)
        if block == name or block in self.gains and self.gains[block] is None:
            return self.probe.layer_error(model, name, module)
        if self._block != block:
            self._record(model, block)
        layer = model.get_submodule(name)
        replace_module(model, name, module)
        try:
            local = self._block_error(model.get_submodule(block))
            if block in self.gains:
                return self.gains[block] * local
            whole = self.probe.error(model)
        finally:
            replace_module(model, name, layer)
        self.anchors[block] = name
        self.gains[block] = whole / local if local > 0 else None  # None: this block is probed whole
        return whole

    def _record(self, model: nn.Module, block: str) -> None:
        """The FP block's inputs and outputs at each probe input (the forward stops after the block)."""
        calls = record_block(model, self.probe, block)
        self._block = block
        self._calls = [(args, kwargs) for args, kwargs, _ in calls]
        self._reference = [_tensors(output) for _, _, output in calls]

    @torch.no_grad()
    def _block_error(self, block: nn.Module) -> float:
        outputs = [_tensors(block(*args, **kwargs)) for args, kwargs in self._calls]
        flat = [t for out in outputs for t in out]
        return relative_mse(flat, [t for ref in self._reference for t in ref])
