"""Uniform scalar baselines, RTN and GPTQ, in the same API shape as `avq.quantize_weight`.

Both store one asymmetric grid per output channel on the `[out, K]` matrix view (K in `F.unfold` order),
or with `group_size=g` one per group of `g` consecutive inputs of a row (the last group of a row may be
shorter): `w ~= scale * (q - zero)` with integer levels `q` in `0..2^bits-1` and an fp16 `scale` and
`zero` per row (or group), so a `b`-bit layer costs `b + 32/K` (or `b + 32/g`) total bits per weight
(docs/design.md, "Total bits"). Groups are the standard strong uniform baseline at low bits (g128 adds
0.25 bits, g64 0.5). The grid always spans 0 (as in the GPTQ reference), which keeps `zero` within
`0..2^bits-1` where fp16 holds it closely. Codes are always chosen against the fp16-rounded grid, so every
reported error is that of what is stored. GPTQ with groups fixes every group's grid before the sweep
(static groups, from the weights as given), which keeps act-order and groups compatible.

- RTN: min-max grid per row, round to nearest.
- GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
  Transformers"): quantize one column at a time and move its rounding error onto the columns not yet
  quantized through the upper Cholesky factor of `H^-1`, in blocks with lazy batch updates; optionally
  in decreasing order of `diag(H)` (act-order) and on a per-row range shrunk to minimise the
  `diag(H)`-weighted rounding error (clip search).

Shapes: `out` rows, `K` inputs, `b` columns in a block.
"""

from __future__ import annotations

import logging
import math
import numbers
import time
from dataclasses import dataclass, field

import torch

from avq.core.aq import relative_error
from avq.core.bits import storage_bits
from avq.core.hessian import prepare_hessian
from avq.core.layout import as_matrix
from avq.core.qweight import StoredWeight
from avq.core.spec import UNIFORM_BITS, UniformSpec

log = logging.getLogger("avq")

MIN_BITS, MAX_BITS = UNIFORM_BITS
FP16_TINY = 2.0**-24  # smallest positive fp16 (subnormal): a scale below it would be stored as 0
CLIP_SHRINKS = tuple(1.0 - 0.01 * i for i in range(51))  # clip search: range x 1.00, 0.99, ..., 0.50


@dataclass
class UniformQuantizedWeight(StoredWeight):
    """A uniformly quantized Linear `[out, in]` or Conv2d `[out, in, kh, kw]` weight.

    `W[o, k] ~= scales[o] * (codes[o, k] - zeros[o])` on the `[out, K]` matrix view; with `group_size`
    `g`, `scales[o, k // g]` and `zeros[o, k // g]`. Scales and zeros are held in fp16, exactly as stored.
    """

    bits: int
    shape: tuple[int, ...]
    codes: torch.Tensor  # [out, K], uint8 levels 0..2^bits-1
    scales: torch.Tensor  # [out] fp16, or [out, ceil(K/g)] with groups
    zeros: torch.Tensor  # like scales, in units of levels (need not be an integer)
    info: dict = field(default_factory=dict, compare=False)  # solver figures (error, seconds)
    group_size: int | None = None  # None: one grid per row

    def __post_init__(self) -> None:
        self.shape = tuple(int(d) for d in self.shape)
        self.validate()

    _tensors = ("codes", "scales", "zeros")

    def validate(self) -> None:
        """Raise `ValueError`/`TypeError` naming the first inconsistency between the tensors and `bits`."""
        _check_bits(self.bits)
        if len(self.shape) not in (2, 4):
            raise ValueError(
                f"UniformQuantizedWeight.shape must be [out, in] or [out, in, kh, kw], got {self.shape}"
            )
        out, K = self.out_features, self.in_features
        _check_group_size(self.group_size)
        grids = grid_shape(out, K, self.group_size)
        expected = {
            "codes": ((out, K), torch.uint8),
            "scales": (grids, torch.float16),
            "zeros": (grids, torch.float16),
        }
        self._check_tensors(expected)
        self._check_code_range(self.codes, self.bits)

    # ---------------------------------------------------------------- decoding
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The decoded weight, shaped like the original."""
        return (
            decode_levels(self.codes, self.scales, self.zeros, self.group_size).to(dtype).reshape(self.shape)
        )

    # ---------------------------------------------------------------- bits
    @property
    def code_bits(self) -> float:
        return float(self.bits)

    @property
    def storage_bits(self) -> int:
        """Everything stored for this weight: codes at `bits` bits, one fp16 scale and zero per row (or
        group)."""
        return storage_bits(self.shape, self.bits, self.group_size)


# -------------------------------------------------------------------- RTN
def quantize_weight_rtn(
    weight: torch.Tensor,
    bits: int,
    hessian: torch.Tensor | None = None,
    *,
    group_size: int | None = None,
    name: str = "layer",
) -> UniformQuantizedWeight:
    """Round-to-nearest on a min-max asymmetric grid per output channel (or per `group_size` inputs of it).

    `hessian` (`[K, K]`, optional) only changes the reported `info["relative_error"]`: with it the
    H-weighted `tr(dW H dW^T) / tr(W H W^T)`, without it the plain `||dW||^2 / ||W||^2`.
    """
    start = time.perf_counter()
    _check_bits(bits)
    _check_group_size(group_size)
    W = _weight_matrix(weight, name)  # [out, K]
    out, K = W.shape
    if hessian is not None:
        _check_hessian(hessian, K, name)
    maxq = (1 << bits) - 1
    rows = _group_rows(W, group_size)  # [out * G, g] (G = 1, g = K without groups)
    scale, zero = (t.reshape(out, -1) for t in _minmax_grid(rows, maxq, 1.0, name))  # [out, G] each
    codes = _round(W, _per_column(scale, group_size, K), _per_column(zero, group_size, K), maxq)  # [out, K]
    options = {"method": "rtn", "group_size": group_size}
    return _finish(weight, hessian, bits, codes, scale, zero, group_size, start, name, options)


# -------------------------------------------------------------------- GPTQ
def quantize_weight_gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    *,
    act_order: bool = True,
    clip_search: bool = True,
    block_size: int = 128,
    damp: float = 0.01,
    group_size: int | None = None,
    name: str = "layer",
) -> UniformQuantizedWeight:
    """GPTQ against the layer's input Hessian `H [K, K]`, asymmetric grid per output channel (or per
    `group_size` inputs of it, fixed before the sweep).

    `damp` adds `damp * mean(diag H) * I` before inverting; `act_order` quantizes columns by decreasing
    `diag(H)`; `clip_search` shrinks each row's min-max range to minimise its `diag(H)`-weighted rounding
    error before GPTQ starts. `info["relative_error"]` is `tr(dW H dW^T) / tr(W H W^T)` with the caller's
    undamped `H`.
    """
    start = time.perf_counter()
    _check_bits(bits)
    if not (isinstance(block_size, numbers.Integral) and block_size >= 1):
        raise ValueError(f"{name}: block_size must be an int >= 1, got {block_size!r}")
    if not (isinstance(damp, numbers.Real) and damp >= 0):
        raise ValueError(f"{name}: damp must be a number >= 0, got {damp!r}")
    _check_group_size(group_size)
    W = _weight_matrix(weight, name).clone()  # [out, K]
    out, K = W.shape
    maxq = (1 << bits) - 1

    # Inputs that were always zero (diag 0) see no error: give them a neutral diagonal entry so that H
    # stays invertible without a global damping, and zero their weights so they do not widen the grid.
    dead = torch.zeros(K, dtype=torch.bool, device=W.device)  # [K]
    hessian_for_solver = hessian  # a wrong type or shape is left for prepare_hessian to report
    if isinstance(hessian, torch.Tensor) and tuple(hessian.shape) == (K, K):
        raw_diag = hessian.detach().diagonal()
        if (raw_diag == 0).any() and not (raw_diag == 0).all():
            hessian_for_solver = hessian.detach().clone()
            hessian_for_solver.diagonal()[raw_diag == 0] = raw_diag[raw_diag != 0].mean()
            dead = (raw_diag == 0).to(W.device)
            W[:, dead] = 0
    H = prepare_hessian(hessian_for_solver, K, name=name, device=W.device)  # [K, K], mean diag 1

    rows = _group_rows(W, group_size)  # [out * G, g]: one grid per row of this view
    if clip_search:
        hdiag = H.diagonal().masked_fill(dead, 0)  # [K]: dead inputs' rounding costs nothing
        hdiag = _group_rows(hdiag.expand(out, K), group_size)  # [out * G, g], like rows
        scale, zero = _clip_search(rows, hdiag, maxq, name)  # [out * G] each
    else:
        scale, zero = _minmax_grid(rows, maxq, 1.0, name)
    scale, zero = scale.reshape(out, -1), zero.reshape(out, -1)  # [out, G]
    S, Z = (_per_column(t, group_size, K).expand(out, K) for t in (scale, zero))  # [out, K]: column grids

    if act_order:
        # Columns with the most input energy go first, while the most columns remain to absorb their error.
        perm = torch.argsort(H.diagonal(), descending=True, stable=True)  # [K]
        W, H, S, Z = W[:, perm], H[perm][:, perm], S[:, perm], Z[:, perm]
    H = H + damp * H.diagonal().mean() * torch.eye(K, device=H.device, dtype=H.dtype)

    codes = _gptq(W, H, S, Z, maxq, block_size)  # [out, K], permuted order
    if act_order:
        codes = codes[:, torch.argsort(perm)]
    options = {
        "method": "gptq",
        "act_order": bool(act_order),
        "clip_search": bool(clip_search),
        "group_size": group_size,
    }
    return _finish(weight, hessian, bits, codes, scale, zero, group_size, start, name, options)


@torch.no_grad()
def _gptq(
    W: torch.Tensor,  # [out, K], columns in processing order
    H: torch.Tensor,  # [K, K], damped, same order
    scale: torch.Tensor,  # [out, K]: each column's grid, same order
    zero: torch.Tensor,  # [out, K]
    maxq: int,
    block_size: int,
) -> torch.Tensor:
    """The GPTQ column sweep; returns the integer levels `[out, K]` (as float)."""
    out, K = W.shape
    # H^-1 = U^T U. Row i of U, divided by U[i, i], is the optimal update of the later columns for a unit
    # error in column i after columns < i are fixed. float64: K^3 once, and it avoids failed factorisations.
    L = torch.linalg.cholesky(H.double())
    U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).to(W.dtype)  # [K, K]
    W = W.clone()
    codes = torch.empty_like(W)  # [out, K]
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = W[:, i1:i2].clone()  # [out, b]: the block, updated column by column
        Err1 = torch.empty_like(W1)  # [out, b]: scaled errors, applied to the columns after the block at once
        U1 = U[i1:i2, i1:i2]  # [b, b]
        for i in range(i2 - i1):
            w = W1[:, i : i + 1]  # [out, 1]
            s, z = scale[:, i1 + i : i1 + i + 1], zero[:, i1 + i : i1 + i + 1]  # [out, 1]
            q = _round(w, s, z, maxq)  # [out, 1]
            codes[:, i1 + i : i1 + i + 1] = q
            err = (w - _dequantize(q, s, z)) / U1[i, i]  # [out, 1]
            W1[:, i + 1 :] -= err @ U1[i : i + 1, i + 1 :]
            Err1[:, i : i + 1] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]  # lazy batch update of everything after the block
    return codes


# -------------------------------------------------------------------- grids
def _round(W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Nearest level on the grid `scale * (q - zero)`, clamped to `0..maxq` (as float)."""
    return torch.clamp(torch.round(W / scale + zero), 0, maxq)


def decode_levels(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int | None
) -> torch.Tensor:
    """Levels `[out, K]` and grids `[out]` / `[out, G]` -> the `[out, K]` float32 weight matrix: what
    `UniformQuantizedWeight.dequantize` and the packed layers' forward compute, without validating."""
    K = codes.shape[1]
    per_column = (_per_column(t.float(), group_size, K) for t in (scales, zeros))
    return _dequantize(codes.float(), *per_column)


def _dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Levels -> weights; the single formula both the solvers and `dequantize` use, so they agree."""
    if scale.dim() == 1:
        scale, zero = scale[:, None], zero[:, None]
    return scale.float() * (codes - zero.float())


def _minmax_grid(W: torch.Tensor, maxq: int, shrink: float, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row grid over `shrink x [min(w, 0), max(w, 0)]`, rounded to fp16 (as float32 `[out]`, `[out]`)."""
    lo = W.min(1).values.clamp(max=0) * shrink  # [out]
    hi = W.max(1).values.clamp(min=0) * shrink  # [out]
    scale = (hi - lo) / maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero row: any grid holds it
    scale = scale.clamp_min(FP16_TINY).half().float()
    if not torch.isfinite(scale).all():
        raise ValueError(f"{name}: weight range {float(W.abs().max()):.3g} is too large for fp16 scales")
    zero = (-lo / scale).half().float()  # computed from the stored scale, so the grid still ends near lo
    return scale, zero


def _clip_search(
    W: torch.Tensor, hdiag: torch.Tensor, maxq: int, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of `W [R, n]`, the shrink of the min-max range with the least `diag(H)`-weighted rounding
    error (`hdiag`: `[R, n]`, the diagonal entries of each row's inputs)."""
    best_scale, best_zero = _minmax_grid(W, maxq, 1.0, name)
    best_err = torch.full_like(best_scale, math.inf)  # [R]
    for shrink in CLIP_SHRINKS:
        scale, zero = _minmax_grid(W, maxq, shrink, name)
        E = W - _dequantize(_round(W, scale[:, None], zero[:, None], maxq), scale, zero)  # [R, n]
        err = (E * E * hdiag).sum(1)  # [R]
        better = err < best_err  # strict: ties keep the wider range
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def uniform_name(bits: int, group_size: int | None = None) -> str:
    """`int2` (one grid per row), `int2g128` (a grid per 128 inputs): how reports name a uniform layer."""
    return UniformSpec(bits, group_size).name


def grid_shape(out: int, K: int, group_size: int | None) -> tuple[int, ...]:
    """Shape of a uniform weight's `scales` / `zeros`: `[out]`, or `[out, ceil(K / g)]` with groups."""
    return (out,) if group_size is None else (out, -(-K // group_size))


def _group_rows(W: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """`W [r, K]` as one row per grid: `[r * G, g]`, a short last group padded with zeros (every grid spans
    0 anyway, and a zero rounds to the grid exactly); `W` itself without groups."""
    if group_size is None:
        return W
    r, K = W.shape
    G = -(-K // group_size)
    padded = torch.nn.functional.pad(W, (0, G * group_size - K))  # [r, G * g]
    return padded.reshape(r * G, group_size)


def _per_column(grid: torch.Tensor, group_size: int | None, K: int) -> torch.Tensor:
    """A grid tensor `[out]` or `[out, G]` spread to every column: `[out, K]` (`[out, 1]` without groups)."""
    if group_size is None:
        return grid.reshape(-1, 1)
    return grid.repeat_interleave(group_size, dim=1)[:, :K]


def _check_group_size(group_size: int | None) -> None:
    if group_size is None:
        return
    if not isinstance(group_size, numbers.Integral) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"group_size must be None or an int >= 1, got {group_size!r}")


# -------------------------------------------------------------------- checks and result
def _check_bits(bits: int) -> None:
    if not isinstance(bits, numbers.Integral) or isinstance(bits, bool):
        raise TypeError(f"bits must be an int, got {bits!r}")
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in {MIN_BITS}..{MAX_BITS}, got {bits}")


def _weight_matrix(weight: torch.Tensor, name: str) -> torch.Tensor:
    """Check a Linear/Conv2d weight and return its float32 `[out, K]` view (a copy for non-fp32 input)."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name}: weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() not in (2, 4):
        raise ValueError(
            f"{name}: expected a Linear [out, in] or Conv2d [out, in, kh, kw] weight, "
            f"got shape {tuple(weight.shape)}"
        )
    if not weight.is_floating_point():
        raise TypeError(f"{name}: weight must be a floating-point tensor, got {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError(f"{name}: weight is empty, shape {tuple(weight.shape)}")
    W = as_matrix(weight.detach()).float()  # [out, K]
    if not torch.isfinite(W).all():
        raise ValueError(f"{name}: weight contains NaN or inf")
    return W


def _check_hessian(hessian: torch.Tensor, K: int, name: str) -> None:
    """Type, shape and finiteness only: RTN uses `H` just to report the error, so it needs no damping."""
    if not isinstance(hessian, torch.Tensor):
        raise TypeError(f"{name}: hessian must be a torch.Tensor, got {type(hessian).__name__}")
    if tuple(hessian.shape) != (K, K):
        raise ValueError(
            f"{name}: hessian must be [K, K] = [{K}, {K}] for this weight, got {list(hessian.shape)}"
        )
    if not torch.isfinite(hessian).all():
        raise ValueError(f"{name}: hessian contains NaN or inf")


def _finish(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    bits: int,
    codes: torch.Tensor,  # [out, K] levels (float)
    scale: torch.Tensor,  # [out, G], fp16-representable (G = 1 without groups)
    zero: torch.Tensor,  # [out, G], fp16-representable
    group_size: int | None,
    start: float,
    name: str,
    options: dict,
) -> UniformQuantizedWeight:
    """Pack the result and measure its error from the stored tensors (what `dequantize` returns)."""
    result = UniformQuantizedWeight(
        bits=bits,
        shape=tuple(weight.shape),
        codes=codes.to(torch.uint8).cpu(),
        scales=(scale if group_size else scale.reshape(-1)).half().cpu(),
        zeros=(zero if group_size else zero.reshape(-1)).half().cpu(),
        group_size=group_size,
    )
    reference = weight.detach().float()
    approximation = result.dequantize().to(reference.device)
    if hessian is None:
        H = torch.eye(result.in_features, device=reference.device)
        metric = "frobenius"
    else:
        H = hessian.detach().to(reference.device)
        metric = "hessian"
    result.info = {
        **options,
        "relative_error": _relative_error(reference, approximation, H),
        "error_metric": metric,
        "seconds": time.perf_counter() - start,
    }
    log.debug(
        "%s: %s %d bits, relative error %.5f", name, options["method"], bits, result.info["relative_error"]
    )
    return result


def _relative_error(weight: torch.Tensor, approximation: torch.Tensor, hessian: torch.Tensor) -> float:
    """`avq.core.aq.relative_error`, defined as 0 (exact) or inf for a weight the inputs cannot see."""
    try:
        return relative_error(weight, approximation, hessian)
    except ValueError:  # tr(W H W^T) == 0
        E = as_matrix(weight - approximation).double()
        return 0.0 if float(((E @ hessian.double()) * E).sum()) <= 0 else math.inf
