"""The code search shared by the AQ solver (`avq.core.aq`) and fine-tuning's V step (`finetune.pv`): for
one group per row, beam search over the `M` codebooks on a quadratic change in loss."""

from __future__ import annotations

import torch


def candidate_rhs(codebooks: torch.Tensor, metric: torch.Tensor) -> torch.Tensor:
    """`[M, g + 2, C]`: the codewords (transposed), their norms `c^T metric c`, ones (for `beam_search`)."""
    norms = ((codebooks @ metric) * codebooks).sum(-1)  # [M, C]
    return torch.cat([codebooks.transpose(1, 2), norms[:, None], torch.ones_like(norms)[:, None]], 1)


def beam_search(
    current: torch.Tensor,  # [out, M]
    codebooks: torch.Tensor,  # [M, C, g]
    rhs: torch.Tensor,  # [M, g + 2, C]: codewords^T, their H_jj-norms, ones
    HJJ: torch.Tensor,  # [g, g], or [out, g, g]: a metric per row
    p: torch.Tensor,  # [out, g]
    scales: torch.Tensor,  # [out]
    *,
    beam_width: int = 8,
    score_chunk: int = 1 << 22,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best codes of one group per row, and their change `d [out, g]` to the unscaled group.

    Beam search over the `M` codebooks on the loss change `-2 s p.d + s^2 d^T HJJ d` (`_Solver.update_codes`
    explains the terms); `rhs` comes from `candidate_rhs(codebooks, HJJ)`. Used by the solver and by
    fine-tuning's V step (`avq.finetune.pv`), whose rows are groups of different input columns: there
    `HJJ` is one `[g, g]` block of the input metric per row, and `rhs` holds zero norms (the per-row
    codeword norms are added here)."""
    per_row = HJJ.dim() == 3
    if per_row:  # [out, M, C]: c^T HJJ[r] c for every row, codebook and codeword
        row_norms = torch.einsum("mcg,rgh,mch->rmc", codebooks, HJJ, codebooks)
    out, M, C = current.shape[0], codebooks.shape[0], codebooks.shape[1]
    width = beam_width if M > 1 else 1  # one codebook: the search is already exhaustive
    rows_per_chunk = max(1, score_chunk // (width * C))
    best_codes = torch.empty_like(current)
    best_delta = torch.empty_like(p)
    for lo in range(0, out, rows_per_chunk):
        rows = slice(lo, min(out, lo + rows_per_chunk))
        s = scales[rows, None]  # [r, 1]
        s2 = s * s
        sp = s * p[rows]  # [r, g]
        beam_codes = current[rows, None, :].clone()  # [r, b, M]
        beam_delta = torch.zeros_like(sp)[:, None, :]  # [r, b, g]: change to the group so far
        for m in range(M):
            book = codebooks[m]  # [C, g]
            # Remove codebook m's codeword: d = base + book[c] for the candidate c.
            base = beam_delta - book[beam_codes[..., m]]  # [r, b, g]
            baseH = torch.einsum("rbg,rgh->rbh", base, HJJ[rows]) if per_row else base @ HJJ  # [r, b, g]
            const = (s2 * (baseH * base).sum(-1)) - 2 * (sp[:, None, :] * base).sum(-1)  # [r, b]
            linear = 2 * (s2[..., None] * baseH - sp[:, None, :])  # [r, b, g]
            # scores = const + linear . book[c] + s^2 norms[c], as one GEMM over [linear | s^2 | const].
            lhs = torch.cat([linear, s2[..., None].expand(-1, linear.shape[1], 1), const[..., None]], -1)
            scores = lhs @ rhs[m]  # [r, b, C]
            if per_row:
                scores = scores + s2[..., None] * row_norms[rows, m][:, None, :]
            flat = scores.reshape(scores.shape[0], -1)  # [r, b*C]
            k = min(width, flat.shape[1])
            top = flat.topk(k, dim=1, largest=False).indices if k > 1 else flat.argmin(1, keepdim=True)
            parent, choice = top // C, top % C  # [r, k]
            beam_codes = torch.gather(beam_codes, 1, parent[..., None].expand(-1, -1, M)).clone()
            beam_codes[..., m] = choice
            base = torch.gather(base, 1, parent[..., None].expand(-1, -1, base.shape[-1]))
            beam_delta = base + book[choice]
            beam_score = torch.gather(flat, 1, top)  # [r, k]
        winner = beam_score.argmin(1)  # [r]
        pick = torch.arange(winner.shape[0], device=winner.device)
        best_codes[rows] = beam_codes[pick, winner]
        best_delta[rows] = beam_delta[pick, winner]
    return best_codes, best_delta
