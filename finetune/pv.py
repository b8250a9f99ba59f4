"""The P and V steps of PV-Tuning on `AQLinear` / `AQConv2d` layers.

P step: AdamW on the continuous parameters: every layer's codebooks and scales, and every parameter left
in FP (norms, biases, embeddings, FP-kept layers); `p_step_parameters` names them and their groups.

V step (codes), in two parts:

1. Straight-through update of the dequantized weights. Each quantized layer gets a dense fp32 *shadow*
   `delta [out, G, g]` (zero at the start): the offset, in the codebooks' units (each row divided by its
   scale), of the weights the optimizer wants from the decoded ones. The target is
   `W~ = scales * (A + delta)`, `A` the sum of the group's codewords (`W = scales * A` is the decoded
   weight). While `straight_through` is active the layer's forward uses
   `W + scales * (delta - delta.detach())`, which *is* `W` (exactly: `x - x = 0`) but sends
   `scales * dL/dW` into `delta.grad`; AdamW (group "shadow", one step count per group) then moves `delta`
   like a latent full-precision weight. Adam's steps are about `lr` per element whatever the gradient's
   size, so in these units `lr_shadow` is a fraction of a row's scale per step in every layer, however
   large its weights. Because `delta` is an offset, a P step that moves codebooks or scales moves the
   target with them.
2. Code update (`v_step`), per layer, in plain L2 (`v_metric="l2"`, the default) or in the metric of
   the layer's inputs (`v_metric="hessian"`): `H_j [g, g]`, the Gram matrix of the group's input
   columns over the V step's batch (`recording_metrics`, block-diagonal: groups do not interact), so a
   change is weighed by what it does to the layer's output on the data, as the AQ solver weighs it. The
   groups whose shadow moved most (`s^2 delta_g^T H_j delta_g`) are the candidates, at most
   `max_code_change` of the layer's groups; each is re-encoded by the AQ solver's beam search around its
   target `W~_g` in that metric (with the row's scale and the current codebooks); a candidate is kept only
   if its new codes lower `(W~_g - W_g)^T H_j (W~_g - W_g)`; kept changes are accepted in order of
   decreasing move while the layer's weight change stays within `trust_ratio * ||W||_F`. With
   `v_metric="l2"`, `H_j = I`. Measured on digits-unet-mini W2A8 (`benchmarks/v_step_ablation.py`, 150
   steps, 3 seeds), both beat P only on held-out loss by far more than the seed spread, and L2 beats the
   input metric, although the metric V step changes twice as many codes. For an accepted group the
   decoded weight jumps to the new codewords and the shadow keeps the remainder,
   `delta_g = A_g(old) + delta_g - A_g(new)`, so the target never moves in a V step.

What the optimizer state of changed groups and codewords becomes is `avq.finetune.semi`'s job.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from avq.core.beam import beam_search, candidate_rhs
from avq.core.modules import AQModule
from avq.core.qweight import decode


# ============================================================================ layers and shadows
@dataclass
class ShadowLayer:
    """One quantized layer and its straight-through shadow `delta [out, G, g]` (fp32, requires grad);
    `metric [G, g, g]`: the input Gram blocks of the last batch `recording_metrics` saw (None: L2)."""

    name: str
    module: AQModule
    delta: torch.Tensor
    metric: torch.Tensor | None = None

    @property
    def num_groups(self) -> int:
        return self.delta.shape[0] * self.delta.shape[1]

    @property
    def num_codes(self) -> int:
        return self.module.codes.numel()


def quantized_layers(model: nn.Module) -> list[tuple[str, AQModule]]:
    """`(name, module)` of every `AQLinear` / `AQConv2d` of `model`, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, AQModule)]


def make_shadows(model: nn.Module) -> list[ShadowLayer]:
    """A zero shadow per quantized layer, on the layer's device."""
    layers = []
    for name, module in quantized_layers(model):
        out, G, _ = module.codes.shape
        g = module.codebooks.shape[-1]
        delta = torch.zeros(out, G, g, dtype=torch.float32, device=module.codes.device, requires_grad=True)
        layers.append(ShadowLayer(name, module, delta))
    return layers


@contextlib.contextmanager
def straight_through(layers: Sequence[ShadowLayer]) -> Iterator[None]:
    """Route `dL/dW` of each layer's decoded weight into its shadow's `.grad` for the duration.

    Sets an instance attribute `_weight` on each module (shadowing `AQModule._weight`, which the kernel
    dispatch calls whenever autograd is on) and removes it on exit. The forward values are unchanged.
    """

    def patched(module: AQModule, delta: torch.Tensor):
        def weight() -> torch.Tensor:
            w = decode(module.codes, module.codebooks, module.scales)  # [out, K], float32
            zero = (delta - delta.detach()) * module.scales.detach().float()[:, None, None]  # [out, G, g]
            return (w + zero.reshape(w.shape)).reshape(module.shape)

        return weight

    installed = []
    try:
        for layer in layers:
            if "_weight" in layer.module.__dict__:
                raise RuntimeError(f"straight_through: layer {layer.name!r} is already patched")
            layer.module.__dict__["_weight"] = patched(layer.module, layer.delta)
            installed.append(layer.module)
        yield
    finally:
        for module in installed:
            module.__dict__.pop("_weight", None)


@contextlib.contextmanager
def recording_metrics(layers: Sequence[ShadowLayer]) -> Iterator[None]:
    """While active, each layer's forward adds its input's Gram blocks to `layer.metric` `[G, g, g]`:
    `sum_n x[n, J] x[n, J]^T` over the group's input columns `J` and every input row (conv inputs unfolded,
    a sample at a time). Sums, so that ranks sharing a batch add up to the whole batch's
    (`normalised_metric` scales them for the V step). Inputs are taken after any 8-bit input quantizer
    (its hook runs first)."""

    def record(layer: ShadowLayer):
        def hook(module: nn.Module, args: tuple) -> None:
            G, g = layer.delta.shape[1:]
            with torch.no_grad():
                inputs = args[0].detach().float()
                chunks = inputs.split(1) if len(module.shape) == 4 else (inputs,)  # bounds unfolded convs
                for x in chunks:
                    blocks = _input_rows(module, x).reshape(-1, G, g)  # [N, G, g]
                    gram = torch.einsum("ngi,ngj->gij", blocks, blocks)  # [G, g, g]
                    layer.metric = gram if layer.metric is None else layer.metric + gram

        return hook

    handles = []
    for layer in layers:
        layer.metric = None
        handles.append(layer.module.register_forward_pre_hook(record(layer)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def normalised_metric(metric: torch.Tensor | None) -> torch.Tensor | None:
    """`metric` scaled to mean diagonal 1 (the V step's comparisons are within a layer); None (L2) when the
    layer saw no input."""
    if metric is None:
        return None
    mean = metric.diagonal(dim1=1, dim2=2).mean()
    return metric / mean if mean > 0 else None


def _input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as the `[N, K]` rows its weight matrix multiplies (convs: `F.unfold` columns)."""
    K = math.prod(module.shape[1:])
    if len(module.shape) == 2:
        return x.reshape(-1, K)
    kernel = module.shape[2:]
    padding = module.padding
    if padding == "valid":
        padding = (0, 0)
    elif padding == "same":  # stride 1
        padding = tuple(d * (k - 1) // 2 for d, k in zip(module.dilation, kernel, strict=True))
    cols = F.unfold(x, kernel, dilation=module.dilation, padding=padding, stride=module.stride)  # [B, K, L]
    return cols.transpose(1, 2).reshape(-1, K)


def p_step_parameters(model: nn.Module) -> list[tuple[str, str, torch.Tensor, int]]:
    """`(name, group, parameter, slot_dims)` for `SlotAdamW`: codebooks (one slot per codeword, so SeMI
    can reset codewords), scales, and every other parameter ("fp")."""
    aq = {name for name, _ in quantized_layers(model)}
    params = []
    for name, param in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        if owner in aq and leaf == "codebooks":
            params.append((name, "codebooks", param, 2))  # [M, C, g]: slots (codebook, codeword)
        elif owner in aq and leaf == "scales":
            params.append((name, "scales", param, 0))
        else:
            params.append((name, "fp", param, 0))
    return params


def shadow_name(layer: str) -> str:
    """The optimizer / checkpoint name of a layer's shadow."""
    return f"shadow:{layer}"


# ============================================================================ beam search
def metric_beam_search(
    target: torch.Tensor,  # [n, g] groups to approximate (weight units)
    current: torch.Tensor,  # [n, M] current codes
    codebooks: torch.Tensor,  # [M, C, g]
    scales: torch.Tensor,  # [n] scale of each group's row
    beam_width: int,
    metric: torch.Tensor | None = None,  # [n, g, g] each group's input metric; None: identity (L2)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes `[n, M]` (int64) minimising `e^T H e` for `e = target - s * sum_m codebooks[m, c_m]`, by the AQ
    solver's beam search (`avq.core.beam`) starting from `current`; and the change `[n, g]` they make to
    the unscaled group. The metric is block-diagonal (one `H` per group, or `I`), so the groups do not
    interact and every `(row, group)` pair is searched independently: the pairs are passed to the search
    as the rows of one group.
    """
    n, M = current.shape
    g = codebooks.shape[-1]
    books = codebooks.float()
    if n == 0:
        return current.long(), target.new_zeros(0, g)
    cur = current.long()
    unscaled = books[torch.arange(M, device=books.device)[None, :], cur].sum(1)  # [n, g]
    residual = target.float() - scales.float()[:, None] * unscaled  # [n, g]
    if metric is None:
        eye = torch.eye(g, dtype=torch.float32, device=books.device)
        rhs = candidate_rhs(books, eye)  # [M, g + 2, C]
        return beam_search(cur, books, rhs, eye, residual, scales.float(), beam_width=beam_width)
    H = metric.float()  # [n, g, g]
    p = torch.einsum("ng,ngh->nh", residual, H)  # [n, g]: the residual through the metric, E H[:, J]
    rhs = candidate_rhs(books, torch.zeros(g, g, device=books.device))  # norms are added per row
    return beam_search(cur, books, rhs, H, p, scales.float(), beam_width=beam_width)


# ============================================================================ V step
@dataclass
class LayerChange:
    """What one V step did to one layer."""

    name: str
    groups: torch.Tensor  # [k] flat indices (row * G + group) of groups whose codes changed
    old_codes: torch.Tensor  # [k, M] int64
    new_codes: torch.Tensor  # [k, M] int64
    candidates: int  # groups re-encoded (after the max_code_change cap)
    trust_rejected: int  # improving re-encodings dropped by the trust ratio
    relative_change: float  # ||W_new - W_old||_F / ||W_old||_F

    @property
    def codes_changed(self) -> int:
        return int((self.old_codes != self.new_codes).sum())


@torch.no_grad()
def v_step(
    layers: Sequence[ShadowLayer],
    *,
    max_code_change: float,
    trust_ratio: float | None,
    beam_width: int,
) -> list[LayerChange]:
    """Update codes (and shadows) of every layer as described in the module docstring; one `LayerChange`
    per layer. Deterministic for given tensors."""
    return [_v_step_layer(layer, max_code_change, trust_ratio, beam_width) for layer in layers]


def _v_step_layer(
    layer: ShadowLayer, max_code_change: float, trust_ratio: float | None, beam_width: int
) -> LayerChange:
    module, delta = layer.module, layer.delta
    codes = module.codes  # [out, G, M]
    out, G, M = codes.shape
    g = delta.shape[-1]
    books = module.codebooks.detach().float()  # [M, C, g]
    scales = module.scales.detach().float()  # [out]
    empty = codes.new_zeros(0, M, dtype=torch.int64)

    def unchanged(candidates: int = 0, rejected: int = 0) -> LayerChange:
        return LayerChange(layer.name, empty[:, 0], empty, empty, candidates, rejected, 0.0)

    # [G, g, g] per group of input columns (None: L2); row r's group j uses metric[j]
    metric = normalised_metric(layer.metric)
    if metric is None:
        drift = delta.detach().pow(2).sum(-1).reshape(-1)  # [out*G]: squared move of each group (book units)
    else:  # [out*G]: delta_g^T H_j delta_g, the output change the move stands for (book units)
        d = delta.detach()
        drift = torch.einsum("ogi,gij,ogj->og", d, metric, d).reshape(-1)
    k = min(int(max_code_change * out * G), int((drift > 0).sum()))
    if k == 0:
        return unchanged()
    candidates = drift.topk(k).indices  # [k], largest move first
    rows = candidates // G
    flat_codes = codes.view(-1, M)  # [out*G, M] (a view: writes reach the buffer)
    current = flat_codes[candidates].long()  # [k, M]
    s = scales[rows]  # [k]
    unscaled = books[torch.arange(M, device=books.device)[None, :], current].sum(1)  # [k, g]
    flat_delta = delta.detach().view(-1, g)  # [out*G, g] (a view)
    move = s[:, None] * flat_delta[candidates]  # [k, g]: W~ - W of the candidates (weight units)
    target = s[:, None] * unscaled + move  # [k, g]: W~ of the candidates
    H = None if metric is None else metric[candidates % G]  # [k, g, g]
    new, change = metric_beam_search(target, current, books, s, beam_width, H)  # [k, M], [k, g] unscaled
    step = s[:, None] * change  # [k, g]: change of the decoded weights

    def size(e: torch.Tensor) -> torch.Tensor:  # [k]: e^T H e per candidate (H = I: squared L2)
        return e.pow(2).sum(-1) if H is None else torch.einsum("ki,kij,kj->k", e, H, e)

    err_old, err_new = size(move), size(move - step)
    improved = (new != current).any(1) & (err_new < err_old * (1 - 1e-6))
    cost = torch.where(improved, step.pow(2).sum(-1), torch.zeros_like(err_old))  # [k]
    w_norm2 = decode(codes, books, scales).pow(2).sum()  # ||W_old||_F^2
    if trust_ratio is None:
        within = torch.ones_like(improved)
    else:
        within = torch.cumsum(cost, 0) <= (trust_ratio**2) * w_norm2
    accept = improved & within
    rejected = int((improved & ~within).sum())
    if not bool(accept.any()):
        return unchanged(k, rejected)
    idx = candidates[accept]
    old_codes, new_codes = current[accept], new[accept]
    flat_codes[idx] = new_codes.to(codes.dtype)
    flat_delta[idx] -= change[accept]  # the target stays where it was
    relative = float(cost[accept].sum().sqrt() / w_norm2.sqrt().clamp_min(1e-30))
    return LayerChange(layer.name, idx, old_codes, new_codes, k, rejected, relative)
