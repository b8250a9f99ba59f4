"""LAQ's whole-model probe, replayed from the layer's block: the same errors for fewer forwards.

A layer inside block `B` of a chain of blocks (`transformer_blocks.7`, where each block's output goes only to
the next) cannot change what blocks `0 .. B-1` compute. So its whole-model probe need not run them: block
`B-1` returns its recorded FP output, blocks `0 .. B-2` return the same (their outputs reach only `B-1`, which
no longer reads its input), and the forward from `B` on, whatever the model computes around its blocks
included, is the whole model's. On a transformer of `L` blocks a probe then costs about `(L - B) / L` of a
forward instead of one: half, on average (SD3-medium: 24 blocks of ~14 layers each, whose whole-model probes
were most of LAQ's cost, `benchmarks/results/scale_sd3_cpu.json`).

Per block, once: a forward per probe input, stopped after `B-1`, records its output
(`avq.planning.block_probe.record_block`); then one replayed pass must reproduce the FP reference (relative
MSE at most `TOLERANCE`). Where it does not, or fails, the block's layers are probed on the whole model as
before. That is the case where the blocks are not a chain: a UNet's down blocks feed skip connections, a
U-ViT's early blocks long skips. So the errors are the whole-model probe's, checked, not an approximation
(unlike `block_probe`'s gains). The first block of each list has nothing to skip and is probed whole.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from avq.calibration.statistics import block_of
from avq.planning.block_probe import record_block
from avq.planning.sensitivity import SwapProbe

log = logging.getLogger(__name__)

TOLERANCE = 1e-12  # relative MSE of the replayed FP outputs (exactly 0 where kernels are deterministic)


def predecessors(model: nn.Module, block: str) -> list[str]:
    """The blocks of `block`'s `nn.ModuleList` that run before it (`transformer_blocks.0 .. 6` for
    `transformer_blocks.7`); none for a block outside a list or first in it."""
    parent, _, index = block.rpartition(".")
    if not parent or not index.isdigit():
        return []
    try:
        blocks = model.get_submodule(parent)
    except AttributeError:
        return []
    if not isinstance(blocks, nn.ModuleList):
        return []
    return [f"{parent}.{i}" for i in range(int(index))]


def _fresh(output: Any) -> Any:
    """A copy of a block's output whose tensors the model may edit in place (tuples, lists, None, tensors)."""
    if isinstance(output, torch.Tensor):
        return output.clone()
    if isinstance(output, (tuple, list)):
        return type(output)(_fresh(item) for item in output)
    if output is None:
        return None
    raise TypeError(f"cannot replay a block output of type {type(output).__name__}")


@dataclass
class ReplayProbe(SwapProbe):
    """`probe`'s whole-model errors, each layer's forward replayed from its block (module docstring).

    `replayed`: the blocks whose layers were measured by replay; `whole`: those probed on the whole model.
    """

    probe: SwapProbe
    replayed: list[str] = field(default_factory=list)
    whole: list[str] = field(default_factory=list)
    _block: str | None = None  # the block prepared for
    _skipped: list[str] = field(default_factory=list)  # its predecessors, stubbed (empty: probe whole)
    _outputs: list[Any] = field(default_factory=list)  # the last predecessor's FP output per forward

    @property
    def num_inputs(self) -> int:
        return self.probe.num_inputs

    def error(self, model: nn.Module) -> float:
        return self.probe.error(model)

    def forward_input(self, model: nn.Module, i: int) -> None:
        self.probe.forward_input(model, i)

    def layer_error(self, model: nn.Module, name: str, module: nn.Module) -> float:
        """The model's relative output error with layer `name` replaced by `module` (restored after)."""
        block = block_of(name)
        if block != self._block:
            self._prepare(model, block)
        if not self._skipped:
            return self.probe.layer_error(model, name, module)
        with self._replaying(model):
            return self.probe.layer_error(model, name, module)

    def _prepare(self, model: nn.Module, block: str) -> None:
        self._block, self._skipped, self._outputs = block, [], []
        skipped = predecessors(model, block)
        if skipped:
            self._outputs = [output for _, _, output in record_block(model, self.probe, skipped[-1])]
            self._skipped = skipped
            try:
                with self._replaying(model):
                    error = self.probe.error(model)
            except Exception as err:  # noqa: BLE001 - any failure means: not a chain, probe it whole
                log.debug("LAQ replay from %s failed (%s): probed on the whole model", block, err)
                error = float("inf")
            if not error <= TOLERANCE:
                self._skipped, self._outputs = [], []
        (self.replayed if self._skipped else self.whole).append(block)

    @contextlib.contextmanager
    def _replaying(self, model: nn.Module) -> Iterator[None]:
        """The model with the skipped blocks returning the recorded output of the forward in progress."""
        forward = [-1]  # index of the model forward in progress (one per probe input, in order)

        def count(*_: Any) -> None:
            forward[0] += 1

        def recorded(*_: Any, **__: Any) -> Any:
            return _fresh(self._outputs[forward[0]])

        handle = model.register_forward_pre_hook(count)
        stubbed = [model.get_submodule(name) for name in self._skipped]
        try:
            for block in stubbed:
                block.forward = recorded  # an instance attribute: nn.Module.__call__ calls it
            yield
        finally:
            handle.remove()
            for block in stubbed:
                block.__dict__.pop("forward", None)
