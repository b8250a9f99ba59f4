"""SeMI — selective momentum invalidation: which optimizer state a code change makes stale, and its reset.

AdamW's moments describe the loss around the *current* point. When a V step gives a group new codes the
model jumps to another discrete point, and two pieces of state now describe the old one:

- the moments of that group's straight-through shadow weights (they accumulated `dL/dW` of the old
  codewords' neighbourhood and would keep pushing the group along the move that has just been made);
- the moments of the codewords whose *assignment set* changed — codeword `c` of codebook `m` is in the
  set when some changed group had `codes[.., m] == c` before the step and not after (lost a group) or
  after and not before (gained one): its gradient is a sum over its groups, so its history is a sum over
  groups it no longer has (or lacks one it now has).

Modes (`FinetuneConfig.semi`), applied right after every V step:

- "selective" (SeMI): for every layer and every group whose codes changed, reset (zero `exp_avg`,
  `exp_avg_sq` *and the step count*, so AdamW restarts for that slot exactly as it would from scratch;
  `avq.finetune.optim`) the shadow slot `(row, group)` — all `g` of its elements; and for every codebook
  `m`, the codebook slots `(m, c)` of each codeword `c` that a changed group left or joined in codebook
  `m` (a group whose code in codebook `m` did not change does not touch codebook `m`). Nothing else:
  scales, FP parameters, the other groups' shadows and the other codewords keep their state.
- "none": nothing is ever reset (plain PV-Tuning with AdamW).
- "all": if any code of any layer changed in this V step, the whole optimizer state (every tensor, every
  slot: codebooks, scales, FP parameters, shadows) is reset; otherwise nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .optim import SlotAdamW
from .pv import LayerChange, ShadowLayer, shadow_name


def semi_reset(
    mode: str, optimizer: SlotAdamW, layers: Sequence[ShadowLayer], changes: Sequence[LayerChange]
) -> dict[str, int]:
    """Reset the optimizer state that `changes` (one V step) made stale, as `mode` says (module docstring).

    Returns counts: `reset_groups` (shadow slots), `reset_codewords` (codebook slots), `reset_all` (1 when
    "all" reset everything).
    """
    counts = {"reset_groups": 0, "reset_codewords": 0, "reset_all": 0}
    changed = [c for c in changes if c.groups.numel()]
    if mode == "none" or not changed:
        return counts
    if mode == "all":
        optimizer.reset_all()
        counts["reset_all"] = 1
        return counts
    if mode != "selective":
        raise ValueError(f"unknown SeMI mode {mode!r}; use 'selective', 'none' or 'all'")
    by_name = {layer.name: layer for layer in layers}
    for change in changed:
        layer = by_name[change.name]
        G = layer.delta.shape[1]
        rows, cols = change.groups // G, change.groups % G
        counts["reset_groups"] += optimizer.reset(shadow_name(change.name), (rows, cols))
        for m, words in enumerate(stale_codewords(change)):
            if words.numel():
                index = (torch.full_like(words, m), words)
                counts["reset_codewords"] += optimizer.reset(f"{change.name}.codebooks", index)
    return counts


def stale_codewords(change: LayerChange) -> list[torch.Tensor]:
    """Per codebook `m`, the sorted codewords whose assignment set `change` altered (left or joined)."""
    M = change.old_codes.shape[1]
    result = []
    for m in range(M):
        moved = change.old_codes[:, m] != change.new_codes[:, m]
        result.append(torch.unique(torch.cat([change.old_codes[moved, m], change.new_codes[moved, m]])))
    return result
