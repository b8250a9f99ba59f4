"""AdamW whose state can be reset slot by slot (what SeMI needs), with pickle-free state tensors.

Why not `torch.optim.AdamW`: it keeps one step count per tensor, and the bias correction uses it. If SeMI
zeroed the moments of one group of a tensor whose step count is, say, 200, the next update of that group
would be `m_hat / sqrt(v_hat) = (1 - b1) g / (sqrt(1 - b2) |g|) ~ 3.2 sign(g)` times the rate: a jump,
not a fresh start. Here every tensor has a step count per *slot* (a slot is an index into the tensor's
leading `slot_dims` dimensions: one group `[out, G]` of a shadow weight, one codeword `[M, C]` of a
codebook; tensors with `slot_dims = 0` have one slot), and resetting a slot zeroes its moments *and* its
step count, so the slot restarts exactly like a new AdamW.

The update is PyTorch's AdamW (decoupled weight decay), element by element with the slot's step count:
`p -= lr * wd * p; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2; t += 1;
p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`. Tensors without a gradient are skipped.
State lives in float32 whatever the parameter dtype.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

STATE_KEYS = ("exp_avg", "exp_avg_sq", "step")


@dataclass
class _Entry:
    name: str
    group: str
    param: torch.Tensor
    slot_dims: int
    exp_avg: torch.Tensor  # like param, float32
    exp_avg_sq: torch.Tensor  # like param, float32
    step: torch.Tensor  # param.shape[:slot_dims], float32 (exact integers up to 2^24)

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(*t.shape, *([1] * (self.param.dim() - self.slot_dims)))


class SlotAdamW:
    """AdamW over named tensors in named groups, with per-slot step counts and resets.

    `params`: `(name, group, tensor, slot_dims)`; `lrs`: base learning rate of each group (multiplied by
    the `lr_scale` passed to `step`). Names must be unique; they key the state in `state_tensors()`.
    """

    def __init__(
        self,
        params: Sequence[tuple[str, str, torch.Tensor, int]],
        lrs: Mapping[str, float],
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        self.lrs = dict(lrs)
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        self.entries: dict[str, _Entry] = {}
        for name, group, param, slot_dims in params:
            if name in self.entries:
                raise ValueError(f"SlotAdamW: duplicate tensor name {name!r}")
            if group not in self.lrs:
                raise ValueError(f"SlotAdamW: {name!r} is in group {group!r}, which has no learning rate")
            if not 0 <= slot_dims <= param.dim():
                raise ValueError(f"SlotAdamW: slot_dims {slot_dims} do not fit {name!r} {list(param.shape)}")
            zeros = torch.zeros(param.shape, dtype=torch.float32, device=param.device)
            self.entries[name] = _Entry(
                name,
                group,
                param,
                slot_dims,
                zeros,
                zeros.clone(),
                torch.zeros(param.shape[:slot_dims], dtype=torch.float32, device=param.device),
            )

    # ------------------------------------------------------------------ access
    def params(self) -> list[torch.Tensor]:
        return [e.param for e in self.entries.values()]

    def entry(self, name: str) -> _Entry:
        try:
            return self.entries[name]
        except KeyError:
            raise KeyError(f"SlotAdamW: no tensor named {name!r}") from None

    def lr(self, group: str, lr_scale: float = 1.0) -> float:
        return self.lrs[group] * lr_scale

    def zero_grad(self) -> None:
        for e in self.entries.values():
            e.param.grad = None

    # ------------------------------------------------------------------ update
    @torch.no_grad()
    def step(self, lr_scale: float = 1.0) -> None:
        b1, b2 = self.betas
        for e in self.entries.values():
            grad = e.param.grad
            if grad is None:
                continue
            lr = self.lrs[e.group] * lr_scale
            g = grad.float()
            p = e.param.float() if e.param.dtype != torch.float32 else e.param
            if self.weight_decay:
                p.mul_(1 - lr * self.weight_decay)
            e.exp_avg.mul_(b1).add_(g, alpha=1 - b1)
            e.exp_avg_sq.mul_(b2).addcmul_(g, g, value=1 - b2)
            e.step.add_(1)
            bias1 = e.broadcast(1 - b1**e.step)
            bias2 = e.broadcast(1 - b2**e.step)
            denom = (e.exp_avg_sq.sqrt() / bias2.sqrt()).add_(self.eps)
            p.addcdiv_(e.exp_avg / bias1, denom, value=-lr)
            if p is not e.param:
                e.param.copy_(p)

    # ------------------------------------------------------------------ resets (SeMI)
    @torch.no_grad()
    def reset(self, name: str, index: tuple[torch.Tensor, ...] | None = None) -> int:
        """Zero the moments and step counts of the slots `index` of tensor `name` (None: all its slots).

        `index`: one integer tensor per slot dimension (advanced indexing into `step`), e.g.
        `(rows, cols)` of shadow groups or `(codebook, codeword)` pairs. Returns the number of slots reset.
        """
        e = self.entry(name)
        if index is None:
            e.exp_avg.zero_()
            e.exp_avg_sq.zero_()
            e.step.zero_()
            return e.step.numel()
        if len(index) != e.slot_dims:
            raise ValueError(f"SlotAdamW.reset: {name!r} has {e.slot_dims} slot dims, not {len(index)}")
        e.exp_avg[index] = 0
        e.exp_avg_sq[index] = 0
        e.step[index] = 0
        return int(index[0].numel()) if index else 1

    def reset_all(self) -> int:
        return sum(self.reset(name) for name in self.entries)

    # ------------------------------------------------------------------ checkpoints
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """`{"<name>.exp_avg" | ".exp_avg_sq" | ".step": tensor}` (copies, for safetensors)."""
        out = {}
        for e in self.entries.values():
            for key in STATE_KEYS:
                out[f"{e.name}.{key}"] = getattr(e, key).detach().cpu().contiguous().clone()
        return out

    @torch.no_grad()
    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Inverse of `state_tensors`; every tensor must be present with its shape."""
        for e in self.entries.values():
            for key in STATE_KEYS:
                full = f"{e.name}.{key}"
                if full not in tensors:
                    raise KeyError(f"optimizer state {full!r} is missing")
                value = tensors[full]
                target = getattr(e, key)
                if tuple(value.shape) != tuple(target.shape):
                    raise ValueError(
                        f"optimizer state {full!r} has shape {list(value.shape)}, "
                        f"expected {list(target.shape)}"
                    )
                target.copy_(value.to(target.device, target.dtype))
