"""Input Hessians `H = E[x x^T]` as the solvers take them: validated, symmetric, damped until positive
definite.

Streaming a layer's Hessian from its inputs is calibration's job (`avq.calibration.hessian`)."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("avq")


SYMMETRIZE_BLOCK = 2048  # rows and columns per block of the in-place symmetrisation


def prepare_hessian(
    hessian: torch.Tensor, K: int, *, name: str = "layer", device: torch.device | None = None
) -> torch.Tensor:
    """Check a `[K, K]` Hessian and return a float32, symmetric, positive-definite copy scaled to mean
    diagonal 1 (the relative objective is unchanged by scaling).

    A singular or slightly indefinite Hessian (few calibration samples, dead inputs, rounding) is damped
    with a multiple of the identity until its Cholesky factorisation succeeds, and the damping is logged.
    """
    return damped_hessian(hessian, K, name=name, device=device)[0]


def damped_hessian(
    hessian: torch.Tensor,
    K: int,
    *,
    name: str = "layer",
    device: torch.device | None = None,
    overwrite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`prepare_hessian`, and the diagonal before damping (`[K]`, same scale): writing it back gives the
    caller's Hessian over its mean diagonal, to report the error against without keeping a copy.

    `overwrite=True` works in `hessian` itself when it is already float32 on `device` (the caller hands it
    over): at K = 23,040 that is one 2 GiB buffer fewer. The symmetrisation is in place either way."""
    if not isinstance(hessian, torch.Tensor):
        raise TypeError(f"{name}: hessian must be a torch.Tensor, got {type(hessian).__name__}")
    if hessian.shape != (K, K):
        raise ValueError(
            f"{name}: hessian must be [K, K] = [{K}, {K}] for this weight, got {list(hessian.shape)}"
        )
    H = hessian.detach().to(device=device or hessian.device, dtype=torch.float32, copy=not overwrite)
    if not torch.isfinite(H).all():
        raise ValueError(f"{name}: hessian contains NaN or inf")
    _symmetrize_(H)
    diag_mean = H.diagonal().mean()
    if not diag_mean > 0:
        raise ValueError(
            f"{name}: hessian has no positive diagonal mass (the layer never saw a non-zero input)"
        )
    H.div_(diag_mean)
    original = H.diagonal().clone()  # [K]
    dead = original <= 0  # inputs that were always zero: their weights do not matter
    if dead.any():
        # Decouple them with a small diagonal entry instead of damping every input (as GPTQ does).
        H[dead, :] = 0
        H[:, dead] = 0
        H[dead, dead] = 1e-2
        log.info("%s: %d of %d inputs were always zero", name, int(dead.sum()), K)
    diagonal = H.diagonal().clone()  # [K]: damping is tried on the diagonal only (H + damp * I)
    # A ladder of Cholesky attempts, not an eigensolver: `eigvalsh` at K = 23,040 takes tens of minutes on
    # a CPU, and the low-resolution convs of a real UNet calibrated on few images are rank-deficient (a
    # 4x4 feature map gives 16 rows per image for K = 23,040). A failing factorisation stops at its first
    # bad pivot, so the failed rungs are cheap; 1e-5 x mean(diag) leaves the objective unchanged in practice.
    damp = 0.0
    for attempt in range(12):
        H.diagonal().copy_(diagonal + damp)
        info = torch.linalg.cholesky_ex(H)[1].item()
        if info == 0:
            break
        damp = 1e-5 if attempt == 0 else damp * 10
    else:
        raise ValueError(f"{name}: hessian could not be made positive definite (damping up to {damp:.3g})")
    if damp > 0:
        log.warning(
            "%s: hessian is singular or not positive semi-definite; damped with %.3g x mean(diag) x I",
            name,
            damp,
        )
    return H, original  # damped in place: its diagonal holds `diagonal + damp`


@torch.no_grad()
def _symmetrize_(H: torch.Tensor) -> None:
    """`H = (H + H^T) / 2` in place, a pair of blocks at a time (no second `[K, K]` buffer)."""
    K, b = H.shape[0], SYMMETRIZE_BLOCK
    for i in range(0, K, b):
        for j in range(i, K, b):
            mean = (H[i : i + b, j : j + b] + H[j : j + b, i : i + b].T) / 2
            H[i : i + b, j : j + b] = mean
            H[j : j + b, i : i + b] = mean.T
