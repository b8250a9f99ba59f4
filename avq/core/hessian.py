"""Input Hessians `H = E[x x^T]` as the solvers take them: validated, symmetric, damped until positive
definite.

Streaming a layer's Hessian from its inputs is calibration's job (`avq.calibration.hessian`)."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("avq")


def prepare_hessian(
    hessian: torch.Tensor, K: int, *, name: str = "layer", device: torch.device | None = None
) -> torch.Tensor:
    """Check a `[K, K]` Hessian and return a float32, symmetric, positive-definite copy scaled to mean
    diagonal 1 (the relative objective is unchanged by scaling).

    A singular or slightly indefinite Hessian (few calibration samples, dead inputs, rounding) is damped
    with a multiple of the identity until its Cholesky factorisation succeeds, and the damping is logged.
    """
    if not isinstance(hessian, torch.Tensor):
        raise TypeError(f"{name}: hessian must be a torch.Tensor, got {type(hessian).__name__}")
    if hessian.shape != (K, K):
        raise ValueError(
            f"{name}: hessian must be [K, K] = [{K}, {K}] for this weight, got {list(hessian.shape)}"
        )
    H = hessian.detach().to(device=device or hessian.device, dtype=torch.float32)
    if not torch.isfinite(H).all():
        raise ValueError(f"{name}: hessian contains NaN or inf")
    # Memory: at K = 23,040 a [K, K] fp32 buffer is 2 GiB, so this makes one copy (the symmetric sum) and
    # works in place on it; the Cholesky probe's factor is the only other buffer, and it is dropped.
    H = H + H.T
    H.div_(2)
    diag_mean = H.diagonal().mean()
    if not diag_mean > 0:
        raise ValueError(
            f"{name}: hessian has no positive diagonal mass (the layer never saw a non-zero input)"
        )
    H.div_(diag_mean)
    dead = H.diagonal() <= 0  # inputs that were always zero: their weights do not matter
    if dead.any():
        # Decouple them with a small diagonal entry instead of damping every input (as GPTQ does).
        H[dead, :] = 0
        H[:, dead] = 0
        H[dead, dead] = 1e-2
        log.info("%s: %d of %d inputs were always zero", name, int(dead.sum()), K)
    diagonal = H.diagonal().clone()  # [K]: damping is tried on the diagonal only (H + damp * I)
    damp = 0.0
    for attempt in range(12):
        H.diagonal().copy_(diagonal + damp)
        info = torch.linalg.cholesky_ex(H)[1].item()
        if info == 0:
            break
        if attempt == 0:
            # Start from the most negative eigenvalue so one more step usually suffices.
            H.diagonal().copy_(diagonal)
            min_eig = torch.linalg.eigvalsh(H).min().item()
            damp = max(-min_eig, 0.0) + 1e-4
        else:
            damp *= 10
    else:
        raise ValueError(f"{name}: hessian could not be made positive definite (damping up to {damp:.3g})")
    if damp > 0:
        log.warning(
            "%s: hessian is singular or not positive semi-definite; damped with %.3g x mean(diag) x I",
            name,
            damp,
        )
    return H  # damped in place: its diagonal holds `diagonal + damp`
