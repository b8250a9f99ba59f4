"""The additive-quantization layer solver (AQLM-style), in one file.

Minimises the layer objective `tr(dW H dW^T)` for `dW = W - diag(s) A`, where each row of `A` is a
sequence of groups and each group is the sum of `M` codewords, one from each codebook:

1. scales `s` = row RMS; residual k-means (faiss), one codebook at a time on the normalised residual;
   then (`init="sequential"`, the default) the first codes are chosen group by group with GPTQ's error
   feedback: groups in decreasing order of input energy (`diag H`, act-order), each group coded by beam
   search against its target in the metric of the not-yet-coded inputs, and its rounding error moved
   onto the groups still to come through the Cholesky factor of `H^-1`. Nearest-codeword (k-means)
   codes ignore `H`; on the strongly correlated Hessians of trained 3x3 convs the alternating rounds
   below cannot escape that start (`benchmarks/layer_solver.py --aq-init kmeans|sequential`). The
   better of the two starts is kept;
2. rounds of
   a. codes: for every group in turn, beam search over the `M` codebooks on the *exact* objective,
      scoring each candidate codeword by its change in loss only (`O(out * 2^B * g)` per group);
   b. codebooks: least squares for all codewords at once (the objective is quadratic in them), solved
      by Jacobi-preconditioned conjugate gradients with matrix-free products;
   c. scales: per-row closed form;
   until the relative improvement of a round falls under `tol` or `max_rounds` is reached;
3. codebooks and scales rounded to fp16 (as stored), then one more code sweep against them.

Shapes: `out` rows, `K` inputs, `G = K/g` groups per row, `M` codebooks, `C = 2^B` codewords.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from avq.core.beam import beam_search, candidate_rhs
from avq.core.hessian import damped_hessian
from avq.core.layout import as_matrix, effective_group_size
from avq.core.qweight import QuantizedWeight, code_dtype
from avq.core.spec import QuantSpec

log = logging.getLogger("avq")


SOLVER_INITS = ("sequential", "kmeans")
SEQUENTIAL_DAMP = 0.01  # GPTQ's damping (x mean diag H) for the H^-1 of the sequential first pass
SEQUENTIAL_BLOCK = 128  # inputs per lazy error-feedback block of the sequential pass (as GPTQ)
CODE_BLOCK = 512  # inputs per block of a code sweep (one `E @ H[:, block]` GEMM each)


@dataclass(frozen=True)
class SolverOptions:
    """How hard the AQ solver works. Defaults are the measured sweet spot (benchmarks/layer_solver.py)."""

    init: str = "sequential"  # first codes: "sequential" (GPTQ-style error feedback) or "kmeans"
    beam_width: int = 8  # candidates kept per group while stepping through the M codebooks
    max_rounds: int = 20  # rounds of (codes, codebooks, scales)
    tol: float = 1e-3  # stop when a round improves the loss by less than this fraction
    kmeans_iters: int = 20  # faiss k-means iterations per codebook at initialisation
    cg_iters: int = 5  # conjugate-gradient iterations of a codebook update (warm-started: 5 match 30)
    score_chunk: int = 1 << 22  # max candidate scores held at once (bounds memory for B = 16)
    seed: int = 0
    device: str | None = None  # default: the weight's device

    def __post_init__(self) -> None:
        if self.init not in SOLVER_INITS:
            raise ValueError(f"init must be one of {SOLVER_INITS}, got {self.init!r}")
        if self.beam_width < 1:
            raise ValueError(f"beam_width must be >= 1, got {self.beam_width}")
        if self.max_rounds < 0:
            raise ValueError(f"max_rounds must be >= 0, got {self.max_rounds}")
        if not self.tol >= 0:
            raise ValueError(f"tol must be >= 0, got {self.tol}")
        if self.kmeans_iters < 1 or self.cg_iters < 0 or self.score_chunk < 1:
            raise ValueError("kmeans_iters must be >= 1, cg_iters >= 0 and score_chunk >= 1")


def quantize_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: QuantSpec,
    *,
    name: str = "layer",
    overwrite_hessian: bool = False,
    **options,
) -> QuantizedWeight:
    """Quantize a Linear `[out, in]` or Conv2d `[out, in, kh, kw]` weight against its input Hessian.

    `options` are the fields of `SolverOptions`. `overwrite_hessian=True` hands `hessian` over: a float32
    Hessian on the compute device is worked on in place instead of copied (one `[K, K]` buffer fewer, 2 GiB
    at `K = 23,040`) and holds garbage afterwards; the quantize run does this. Returns a `QuantizedWeight`
    whose `info` holds the relative error `tr(dW H dW^T) / tr(W H W^T)` of the stored (fp16) result, the
    rounds and seconds.
    """
    opts = SolverOptions(**options)
    start = time.perf_counter()
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be an avq.QuantSpec, got {type(spec).__name__}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name}: weight must be a torch.Tensor, got {type(weight).__name__}")
    g = effective_group_size(tuple(weight.shape), spec)
    device = torch.device(opts.device) if opts.device else weight.device
    W = as_matrix(weight.detach()).to(device=device, dtype=torch.float32)  # [out, K]
    if not torch.isfinite(W).all():
        raise ValueError(f"{name}: weight contains NaN or inf")
    out, K = W.shape
    # [K, K], mean diag 1, damped; `diagonal` [K] is its diagonal before damping
    H, diagonal = damped_hessian(hessian, K, name=name, device=device, overwrite=overwrite_hessian)
    M = spec.num_codebooks
    # Randomness comes from faiss (seeded per codebook) and numpy (`default_rng(opts.seed)`) only: the
    # caller's global torch RNG is left alone.

    scales = W.pow(2).mean(1).sqrt().clamp_min(1e-8)  # [out]
    codebooks, codes = _residual_kmeans(W / scales[:, None], spec, g, opts)  # [M, C, g], [out, G, M]
    solver = _Solver(W, H, M, g, opts)
    loss_ref = solver.reference_loss()
    loss = solver.loss(codes, codebooks, scales)
    if opts.init == "sequential":
        sequential = solver.sequential_codes(codes, codebooks, scales)
        sequential_loss = solver.loss(sequential, codebooks, scales)
        if sequential_loss < loss:
            codes, loss = sequential, sequential_loss
    history = [loss / loss_ref]
    rounds, AH = 0, None
    for rounds in range(1, opts.max_rounds + 1):
        # `AH = decode @ H` travels between the steps (the scale step leaves it unchanged): the code sweep
        # updates it, the codebook step starts from it and returns it with the loss, so a round costs
        # `cg_iters + 2` products with `H` in all.
        codes, AH = solver.update_codes(codes, codebooks, scales, AH)
        codebooks, AH, new_loss = solver.update_codebooks(codes, codebooks, scales, AH=AH)
        scales = solver.update_scales(codes, codebooks, scales, AH=AH)
        history.append(new_loss / loss_ref)
        improvement = (loss - new_loss) / max(loss, 1e-30)
        loss = new_loss
        log.debug("%s: round %d relative error %.5f", name, rounds, history[-1])
        if improvement < opts.tol:
            break

    # Round to the stored precision, then let the codes adapt to the rounded values.
    codebooks = codebooks.half().float()
    scales = scales.half().float()
    del AH
    codes, _ = solver.update_codes(codes, codebooks, scales)
    # Report against the caller's Hessian: the solver's is damped, so its diagonal is put back first (the
    # error is a ratio, the scaling to mean diagonal 1 cancels).
    decoded = scales[:, None] * solver.decode(codes, codebooks)  # [out, K]
    del solver
    H.diagonal().copy_(diagonal)
    info = {
        "relative_error": relative_error(W, decoded, H),
        "rounds": rounds,
        "seconds": time.perf_counter() - start,
        "history": history,
    }
    return QuantizedWeight(
        spec=spec,
        shape=tuple(weight.shape),
        codes=codes.to(torch.int32).to(code_dtype(spec.nbits)).cpu(),
        codebooks=codebooks.half().cpu(),
        scales=scales.half().cpu(),
        info=info,
    )


def _residual_kmeans(
    Wn: torch.Tensor, spec: QuantSpec, g: int, opts: SolverOptions
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codebook m is k-means (faiss) on what codebooks 0..m-1 left unexplained."""
    import faiss  # here, not at the top: loading a quantized model never needs it (~18 MiB, ~0.1 s)

    out, K = Wn.shape
    M, C = spec.num_codebooks, spec.codebook_size
    residual = np.ascontiguousarray(Wn.reshape(-1, g).cpu().numpy(), dtype=np.float32)  # [out*G, g]
    n = residual.shape[0]
    rng = np.random.default_rng(opts.seed)
    books = np.empty((M, C, g), dtype=np.float32)
    codes = np.empty((n, M), dtype=np.int64)
    for m in range(M):
        if n <= C:
            # Fewer groups than codewords: every group gets its own codeword exactly; the spares are
            # jittered copies so that later rounds can still use them.
            extra = residual[rng.integers(0, n, C - n)] + 0.1 * residual.std() * rng.standard_normal(
                (C - n, g)
            )
            centroids = np.concatenate([residual, extra.astype(np.float32)])
        else:
            # faiss subsamples to max_points_per_centroid * C points; cap the total near 2^18 so that
            # 16-bit codebooks (C = 65536) on large layers still initialise in about a minute on a CPU.
            kmeans = faiss.Kmeans(
                g,
                C,
                niter=opts.kmeans_iters,
                seed=opts.seed + 1000 * m,
                max_points_per_centroid=max(4, min(64, (1 << 18) // C)),
                min_points_per_centroid=1,  # small layers are normal here: no "too few points" warning
                verbose=False,
            )
            kmeans.train(residual)
            centroids = kmeans.centroids
        index = faiss.IndexFlatL2(g)
        index.add(centroids)
        _, assignment = index.search(residual, 1)
        books[m] = centroids
        codes[:, m] = assignment[:, 0]
        residual = residual - centroids[assignment[:, 0]]
    codebooks = torch.from_numpy(books).to(Wn.device)
    return codebooks, torch.from_numpy(codes).to(Wn.device).reshape(out, K // g, M)


class _Solver:
    """The three alternating updates, sharing the layer's `W [out, K]` and `H [K, K]`."""

    def __init__(self, W: torch.Tensor, H: torch.Tensor, M: int, g: int, opts: SolverOptions):
        self.W, self.H, self.M, self.g, self.opts = W, H, M, g, opts
        self.out, self.K = W.shape
        self.G = self.K // g
        self.WH = W @ H  # [out, K], once: every loss below is `(W - sA) . (WH - s AH)`

    # ------------------------------------------------------------------ objective
    def decode(self, codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
        """Unscaled `A [out, K]` from codes `[out, G, M]` and codebooks `[M, C, g]`."""
        A = codebooks[0][codes[..., 0]]  # [out, G, g]
        for m in range(1, self.M):
            A = A + codebooks[m][codes[..., m]]
        return A.reshape(self.out, self.K)

    def reference_loss(self) -> float:
        return float((self.WH * self.W).sum())

    def loss(self, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor) -> float:
        return self._loss(self.decode(codes, codebooks), scales)[0]

    def _loss(
        self, A: torch.Tensor, scales: torch.Tensor, AH: torch.Tensor | None = None
    ) -> tuple[float, torch.Tensor]:
        """The loss at the unscaled decode `A [out, K]`, and `A @ H` (computed unless given)."""
        AH = A @ self.H if AH is None else AH  # [out, K]
        s = scales[:, None]
        return float(((self.W - s * A) * (self.WH - s * AH)).sum()), AH

    # ------------------------------------------------------------------ (a) codes
    @torch.no_grad()
    def update_codes(
        self,
        codes: torch.Tensor,
        codebooks: torch.Tensor,
        scales: torch.Tensor,
        AH: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One Gauss-Seidel sweep over the groups; each group's M codes by beam search. Returns the codes and
        their `decode @ H` `[out, K]`; `AH`: that product for the given codes, where the caller has it.

        For a change `d` of row r's group j (unscaled), the loss changes by
        `-2 s_r p_r.d + s_r^2 d^T H_jj d` with `p = E H[:, J]`, so all `C` candidates of a codebook are
        scored with one `[rows, g + 2] x [g + 2, C]` product. The current codes are always a candidate, so a
        sweep never increases the loss.
        """
        g = self.g
        codes = codes.clone()
        AH = self.decode(codes, codebooks) @ self.H if AH is None else AH.clone()  # [out, K]
        s = scales[:, None]  # [out, 1]
        # Blocked like GPTQ's lazy updates: `p` of a block's groups comes from `E H = WH - s AH`, each coded
        # group's change is fed forward to the block's later groups through `H[block, block]`, and `AH`
        # takes the block's changes in one `[out, width] x [width, K]` GEMM. Per group that is
        # `O(out * g * width)` instead of re-reading all of `E` (`O(out * K)`, memory-bound), and the
        # sweep hands the codebook step its `AH`.
        width = max(1, CODE_BLOCK // g) * g
        for b0 in range(0, self.K, width):
            b1 = min(self.K, b0 + width)
            P = self.WH[:, b0:b1] - s * AH[:, b0:b1]  # [out, width]: p of every group in the block
            Hbb = self.H[b0:b1, b0:b1]  # [width, width]
            changes = torch.zeros_like(P)  # [out, width]: the block's unscaled changes
            for j in range(b0 // g, b1 // g):
                J = slice(j * g, (j + 1) * g)
                local = slice(J.start - b0, J.stop - b0)
                HJJ = Hbb[local, local]  # [g, g]
                rhs = candidate_rhs(codebooks, HJJ)
                new_codes, delta = self._beam_search(codes[:, j], codebooks, rhs, HJJ, P[:, local], scales)
                codes[:, j] = new_codes
                changes[:, local] = delta
                P[:, local.stop :] -= (s * delta) @ Hbb[local, local.stop :]
            AH += changes @ self.H[b0:b1]
        return codes, AH

    @torch.no_grad()
    def sequential_codes(
        self, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor
    ) -> torch.Tensor:
        """Codes chosen group by group with GPTQ's error feedback (the first pass of `init="sequential"`).

        Works on the normalised target `X = W / s` (the row loss is `s^2 (x - a) H (x - a)^T`, so scales do
        not change which codes are best). Groups go in decreasing order of `diag H` mass (act-order). With
        `U` the upper Cholesky factor of `H^-1` (permuted, damped), the loss of group `J`'s error `e`
        once every later input is re-optimised is `e (U_JJ^T U_JJ)^-1 e^T`: the group is coded by beam
        search in that metric, then `X[:, later] -= e U_JJ^-1 U[J, later]` (lazily, in blocks). Returns
        `codes` unchanged if `H^-1` cannot be factorised.
        """
        g, G = self.g, self.G
        order = self.H.diagonal().reshape(G, g).sum(1).argsort(descending=True)  # [G]
        cols = (order[:, None] * g + torch.arange(g, device=order.device)).reshape(-1)  # [K]
        # At most two [K, K] buffers besides `self.H` at any time (2 GiB each at K = 23,040).
        H = self.H[cols]  # [K, K] rows in processing order
        for lo in range(0, self.K, SEQUENTIAL_BLOCK):  # columns in place, a block of rows at a time
            H[lo : lo + SEQUENTIAL_BLOCK] = H[lo : lo + SEQUENTIAL_BLOCK][:, cols]
        H.diagonal().add_(SEQUENTIAL_DAMP * H.diagonal().mean())
        L, info = torch.linalg.cholesky_ex(H)
        del H
        if info.item() == 0:
            H_inv = torch.cholesky_inverse(L)  # [K, K]
            del L
            U, info = torch.linalg.cholesky_ex(H_inv, upper=True)  # [K, K]
            del H_inv
        if info.item() != 0:
            log.warning("sequential code init: H^-1 has no Cholesky factor; keeping k-means codes")
            return codes
        codes = codes.clone()
        X = (self.W / scales[:, None])[:, cols]  # [out, K] targets, updated by the error feedback
        A = self.decode(codes, codebooks)[:, cols]  # [out, K] current (k-means) decode
        unit = torch.ones_like(scales)  # [out]: the metric below already holds the row loss
        block = max(1, SEQUENTIAL_BLOCK // g) * g
        for b0 in range(0, self.K, block):
            b1 = min(self.K, b0 + block)
            feedback = torch.zeros(self.out, b1 - b0, device=X.device)  # [out, block]: e U_JJ^-1
            for i in range(b0 // g, b1 // g):
                J = slice(i * g, (i + 1) * g)
                UJJ_inv = torch.linalg.solve_triangular(U[J, J], torch.eye(g, device=U.device), upper=True)
                metric = UJJ_inv @ UJJ_inv.T  # [g, g] = (U_JJ^T U_JJ)^-1
                metric = (metric + metric.T) / 2
                p = (X[:, J] - A[:, J]) @ metric  # [out, g]
                j = int(order[i])
                new_codes, delta = self._beam_search(
                    codes[:, j], codebooks, candidate_rhs(codebooks, metric), metric, p, unit
                )
                codes[:, j] = new_codes
                e = (X[:, J] - A[:, J] - delta) @ UJJ_inv  # [out, g]
                X[:, J.stop : b1] -= e @ U[J, J.stop : b1]
                feedback[:, J.start - b0 : J.stop - b0] = e
            X[:, b1:] -= feedback @ U[b0:b1, b1:]
        return codes

    def _beam_search(self, current, codebooks, rhs, HJJ, p, scales):
        return beam_search(
            current,
            codebooks,
            rhs,
            HJJ,
            p,
            scales,
            beam_width=self.opts.beam_width,
            score_chunk=self.opts.score_chunk,
        )

    # ------------------------------------------------------------------ (b) codebooks
    @torch.no_grad()
    def update_codebooks(
        self,
        codes: torch.Tensor,
        codebooks: torch.Tensor,
        scales: torch.Tensor,
        AH: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Least squares in all codewords at once, by preconditioned conjugate gradients.

        With codes fixed the decoded weight is linear in the codebooks, `A = S(codebooks)`, so the loss is
        quadratic; its normal-equation operator is `S^T(s^2 * (S(x) H))`, applied without forming it.
        Returns the codebooks, their `decode @ H` `[out, K]` and the loss there (never above the start's);
        `AH`: the start's `decode @ H`, where the caller has it.
        """
        s = scales[:, None]
        start_loss, start_AH = self._loss(self.decode(codes, codebooks), scales, AH)
        if self.opts.cg_iters == 0:
            return codebooks, start_AH, start_loss
        flat_codes = codes.reshape(-1, self.M)  # [out*G, M]

        def scatter(grad: torch.Tensor) -> torch.Tensor:  # [out, K] -> [M, C, g]: S^T
            groups = grad.reshape(-1, self.g)  # [out*G, g]
            result = torch.zeros_like(codebooks)
            for m in range(self.M):
                result[m].index_add_(0, flat_codes[:, m], groups)
            return result

        # Jacobi preconditioner: sum over each codeword's assigned groups of s^2 H_kk (cross-codebook
        # terms are left out; they only add where two codebooks' codes coincide).
        hdiag = self.H.diagonal().reshape(1, self.G, self.g)  # [1, G, g]
        diag = scatter((s * s).reshape(-1, 1, 1) * hdiag.expand(self.out, -1, -1))  # [M, C, g]
        # A small ridge towards the current codebooks removes the null space (unused codewords, and a
        # vector added to one codebook and subtracted from another) in which fp32 CG otherwise drifts.
        ridge = 1e-3 * diag[diag > 0].mean()
        diag = diag + ridge

        def operator(x: torch.Tensor) -> torch.Tensor:  # (S^T s^2 H S + ridge) x
            return scatter(s * s * (self.decode(codes, x) @ self.H)) + ridge * x

        x = codebooks.clone()
        r = scatter(s * (self.WH - s * start_AH))  # b - A x at x = codebooks: S^T(s (W - sA) H)
        z = r / diag
        d = z.clone()
        rz = (r * z).sum()
        b_norm = r.norm()
        for _ in range(self.opts.cg_iters):
            Ad = operator(d)
            dAd = (d * Ad).sum()
            if dAd <= 0:
                break
            alpha = rz / dAd
            x += alpha * d
            r -= alpha * Ad
            if r.norm() <= 1e-5 * b_norm:
                break
            z = r / diag
            rz_new = (r * z).sum()
            d = z + (rz_new / rz) * d
            rz = rz_new
        loss, AH = self._loss(self.decode(codes, x), scales)
        if loss > start_loss:
            return codebooks, start_AH, start_loss  # fp32 round-off can defeat CG on a flat objective
        return x, AH, loss

    # ------------------------------------------------------------------ (c) scales
    @torch.no_grad()
    def update_scales(
        self,
        codes: torch.Tensor,
        codebooks: torch.Tensor,
        scales: torch.Tensor,
        AH: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per row, `s = (w H a^T) / (a H a^T)` minimises the row's loss for fixed `a`. `AH`: the decode's
        product with `H` where the caller has it."""
        A = self.decode(codes, codebooks)  # [out, K]
        AH = A @ self.H if AH is None else AH  # [out, K]
        numerator = (self.W * AH).sum(1)
        denominator = (A * AH).sum(1)
        ok = denominator > 1e-12 * denominator.max().clamp_min(1e-30)
        return torch.where(ok, numerator / denominator.clamp_min(1e-30), scales)


def relative_error(weight: torch.Tensor, approximation: torch.Tensor, hessian: torch.Tensor) -> float:
    """`tr(dW H dW^T) / tr(W H W^T)` on the `[out, K]` matrix view (docs/design.md layer objective).

    In float64, a block of `H`'s columns at a time: no second `[K, K]` copy (4 GiB at `K = 23,040`). A
    quadratic form only sees the symmetric part of `H`, so `H` is used as given."""
    W = as_matrix(weight).double()  # [out, K]
    E = W - as_matrix(approximation).double().to(W.device)  # [out, K]
    H = hessian.to(W.device)
    K = H.shape[0]
    step = max(1, (1 << 25) // K)  # columns per block: 256 MiB of float64
    reference = error = 0.0
    for lo in range(0, K, step):
        block = H[:, lo : lo + step].double()  # [K, step]
        reference += float(((W @ block) * W[:, lo : lo + step]).sum())
        error += float(((E @ block) * E[:, lo : lo + step]).sum())
    if not math.isfinite(reference) or reference <= 0:
        raise ValueError("relative_error: tr(W H W^T) must be positive")
    return error / reference
