"""The AQ layer solver: exactness of each update, determinism, shapes/specs, and bad input."""

from __future__ import annotations

import itertools
import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import avq
from avq.core.aq import SolverOptions, _residual_kmeans, _Solver
from avq.core.hessian import prepare_hessian


def correlated_layer(out: int, K: int, seed: int = 0, n: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """A Gaussian weight and the Hessian of inputs with a decaying spectrum (like real activations)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, K, generator=g)
    U, _ = torch.linalg.qr(torch.randn(K, K, generator=g))
    s = 1 / torch.arange(1, K + 1).float().sqrt()
    X = torch.randn(n, K, generator=g) * s @ U.T
    return W, X.T @ X / n


def solver_state(W, H, spec, seed=0):
    g = spec.group_size
    opts = SolverOptions(seed=seed)
    Hp = prepare_hessian(H, W.shape[1])
    scales = W.pow(2).mean(1).sqrt()
    codebooks, codes = _residual_kmeans(W / scales[:, None], spec, g, opts)
    return _Solver(W, Hp, spec.num_codebooks, g, opts), codes, codebooks, scales


def test_code_update_matches_brute_force_joint_search():
    # With beam width >= C the beam holds every choice of codebook 0, so the search over codebook 1 is
    # exhaustive over all C^2 pairs: the result must be as good as brute force on the exact objective.
    spec = avq.QuantSpec(2, 4, 4)
    W, H = correlated_layer(48, 8, seed=1)  # 96 groups for 16 codewords: k-means is not exact
    solver, codes, codebooks, scales = solver_state(W, H, spec)
    solver.W, solver.H = solver.W.double(), solver.H.double()
    codebooks, scales = codebooks.double(), scales.double()
    solver.opts = SolverOptions(beam_width=spec.codebook_size)
    updated, AH = solver.update_codes(codes, codebooks, scales)
    torch.testing.assert_close(AH, solver.decode(updated, codebooks) @ solver.H, rtol=1e-4, atol=1e-4)
    # Group 0 is visited first, so it is searched against the initial codes of group 1.
    for row in range(0, W.shape[0], 7):
        losses = {}
        for pair in itertools.product(range(16), range(16)):
            trial = codes.clone()
            trial[row, 0] = torch.tensor(pair)
            losses[pair] = solver.loss(trial, codebooks, scales)
        chosen = losses[tuple(updated[row, 0].tolist())]
        assert chosen <= min(losses.values()) * (1 + 1e-9)
        assert chosen < losses[tuple(codes[row, 0].tolist())] or chosen == min(losses.values())


def test_code_update_never_increases_loss():
    spec = avq.QuantSpec(2, 5, 4)
    W, H = correlated_layer(16, 32, seed=2)
    solver, codes, codebooks, scales = solver_state(W, H, spec)
    for width in (1, 3):
        solver.opts = SolverOptions(beam_width=width)
        before = solver.loss(codes, codebooks, scales)
        codes, _ = solver.update_codes(codes, codebooks, scales)
        assert solver.loss(codes, codebooks, scales) <= before * (1 + 1e-6)


def test_codebook_update_solves_the_least_squares_problem():
    # Build the quadratic explicitly (loss is linear in the codebooks for fixed codes) and solve it directly.
    spec = avq.QuantSpec(2, 4, 2)
    W, H = correlated_layer(8, 8, seed=3)
    solver, codes, codebooks, scales = solver_state(W, H, spec)
    solver.opts = SolverOptions(cg_iters=400)
    solved, AH, loss = solver.update_codebooks(codes, codebooks, scales)
    # What it returns with the codebooks is their product with H and the loss there.
    torch.testing.assert_close(AH, solver.decode(codes, solved) @ solver.H)
    assert loss == pytest.approx(solver.loss(codes, solved, scales), rel=1e-5)
    n = codebooks.numel()
    basis = torch.eye(n).reshape(n, *codebooks.shape)
    S = torch.stack([(scales[:, None] * solver.decode(codes, b)).reshape(-1) for b in basis], 1)  # [out*K, n]
    Hbig = torch.block_diag(*[solver.H] * W.shape[0])  # [out*K, out*K]
    A = S.T @ Hbig @ S
    b = S.T @ Hbig @ W.reshape(-1)
    direct = torch.linalg.lstsq(A.double(), b.double()).solution.float().reshape(codebooks.shape)
    # The ridge keeps the solution near the start in the null space; compare losses, which are unique.
    direct_loss = solver.loss(codes, direct, scales)
    assert solver.loss(codes, solved, scales) <= direct_loss * 1.002 + 1e-9
    assert solver.loss(codes, solved, scales) < solver.loss(codes, codebooks, scales)


def test_scale_update_is_the_per_row_optimum():
    spec = avq.QuantSpec(1, 4, 4)
    W, H = correlated_layer(5, 16, seed=4)
    solver, codes, codebooks, scales = solver_state(W, H, spec)
    best = solver.update_scales(codes, codebooks, scales)
    base = solver.loss(codes, codebooks, best)
    for factor in (0.98, 1.02):
        assert solver.loss(codes, codebooks, best * factor) > base


def test_rounds_reduce_error_and_info_is_the_stored_error():
    W, H = correlated_layer(32, 64, seed=5)
    spec = avq.QuantSpec(2, 6, 8)
    q0 = avq.quantize_weight(W, H, spec, max_rounds=0)
    q = avq.quantize_weight(W, H, spec, max_rounds=5)
    assert q.info["relative_error"] < q0.info["relative_error"]
    stored = avq.relative_error(W, q.dequantize(), prepare_hessian(H, 64))
    assert q.info["relative_error"] == pytest.approx(stored, rel=1e-3)


def test_more_bits_less_error():
    W, H = correlated_layer(32, 64, seed=6)
    errors = [
        avq.quantize_weight(W, H, avq.QuantSpec(m, b, 4), max_rounds=3).info["relative_error"]
        for m, b in ((1, 4), (1, 8), (2, 8))
    ]
    assert errors[0] > errors[1] > errors[2]


def test_same_seed_same_codes_other_seed_differs():
    W, H = correlated_layer(64, 64, seed=7)
    spec = avq.QuantSpec(2, 6, 4)
    a = avq.quantize_weight(W, H, spec, seed=3, max_rounds=2)
    b = avq.quantize_weight(W, H, spec, seed=3, max_rounds=2)
    c = avq.quantize_weight(W, H, spec, seed=4, max_rounds=2)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.codebooks, b.codebooks)
    assert torch.equal(a.scales, b.scales)
    assert not torch.equal(a.codebooks, c.codebooks)


def test_chunked_scoring_equals_unchunked_for_16_bit_codes():
    W, H = correlated_layer(8, 16, seed=8)
    spec = avq.QuantSpec(1, 16, 8)  # fewer groups than codewords: exercises the small-layer init too
    a = avq.quantize_weight(W, H, spec, max_rounds=1)
    b = avq.quantize_weight(W, H, spec, max_rounds=1, score_chunk=1 << 16)  # one row per chunk
    assert a.codes.dtype == torch.uint16
    assert torch.equal(a.codes, b.codes)
    assert a.info["relative_error"] < 1e-2  # nearly every group owns a codeword


def test_conv_kernel_grouping():
    g = torch.Generator().manual_seed(9)
    weight = torch.randn(8, 4, 3, 3, generator=g)
    X = torch.randn(256, 36, generator=g)
    H = X.T @ X / 256
    q = avq.quantize_weight(weight, H, avq.QuantSpec(2, 6, 9, conv_grouping="kernel"), max_rounds=2)
    assert q.dequantize().shape == weight.shape
    assert q.codes.shape == (8, 4, 2)  # one group per (out, in) kernel
    with pytest.raises(ValueError, match="kernel grouping needs group_size == kh\\*kw = 9"):
        avq.quantize_weight(weight, H, avq.QuantSpec(2, 6, 4, conv_grouping="kernel"))
    # 1x1 convs have no kernel to group: they behave like Linear.
    q1 = avq.quantize_weight(torch.randn(8, 16, 1, 1), H[:16, :16], avq.QuantSpec(1, 4, 4, "kernel"))
    assert q1.codes.shape == (8, 4, 1)


@settings(max_examples=15, deadline=None)
@given(
    out=st.integers(1, 12),
    groups=st.integers(1, 5),
    M=st.integers(1, 3),
    B=st.integers(4, 6),
    g=st.sampled_from([2, 3, 4, 8]),
    conv=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_any_shape_and_spec(out, groups, M, B, g, conv, seed):
    gen = torch.Generator().manual_seed(seed)
    K = groups * g
    weight = torch.randn(out, K, generator=gen)
    if conv:
        weight = weight.reshape(out, K, 1, 1)
    X = torch.randn(4 * K + 4, K, generator=gen)
    H = X.T @ X
    spec = avq.QuantSpec(M, B, g)
    q = avq.quantize_weight(weight, H, spec, max_rounds=2, kmeans_iters=4, seed=seed)
    deq = q.dequantize()
    assert deq.shape == weight.shape and torch.isfinite(deq).all()
    assert q.codes.shape == (out, groups, M) and q.codes.dtype == torch.uint8
    assert int(q.codes.to(torch.int32).max()) < 2**B
    assert q.code_bits == M * B / g
    stored = M * B * out * groups + 16 * (M * 2**B * g + out)
    assert q.total_bits == pytest.approx(stored / (out * K))
    # Never worse than storing nothing, and the reported error is what dequantize gives.
    assert q.info["relative_error"] <= 1.0 + 1e-4
    true = avq.relative_error(weight, deq, prepare_hessian(H, K))
    assert q.info["relative_error"] == pytest.approx(true, rel=1e-2, abs=1e-6)


# ---------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_codebooks=0, nbits=8, group_size=8), "num_codebooks must be in 1..4"),
        (dict(num_codebooks=5, nbits=8, group_size=8), "num_codebooks must be in 1..4"),
        (dict(num_codebooks=1, nbits=3, group_size=8), "nbits must be in 4..16"),
        (dict(num_codebooks=1, nbits=17, group_size=8), "nbits must be in 4..16"),
        (dict(num_codebooks=1, nbits=8, group_size=1), "group_size must be in 2..16"),
        (dict(num_codebooks=1, nbits=8, group_size=32), "group_size must be in 2..16"),
        (dict(num_codebooks=1, nbits=8, group_size=8, conv_grouping="rows"), "conv_grouping must be one of"),
        (dict(num_codebooks=1.0, nbits=8, group_size=8), "num_codebooks must be an int"),
    ],
)
def test_spec_out_of_range(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        avq.QuantSpec(**kwargs)


def test_spec_names_round_trip():
    for spec in (avq.QuantSpec(2, 8, 8), avq.QuantSpec(1, 8, 9, "kernel"), avq.QuantSpec(4, 16, 16)):
        assert avq.QuantSpec.parse(spec.name) == spec
        assert avq.QuantSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="cannot parse spec"):
        avq.QuantSpec.parse("w2a8")


SPEC = avq.QuantSpec(1, 4, 4)


@pytest.mark.parametrize(
    "weight, hessian, message",
    [
        (torch.randn(4, 8), torch.eye(6), r"hessian must be \[K, K\] = \[8, 8\]"),
        (torch.randn(4, 10), torch.eye(10), "K = 10 .* not divisible by group_size 4"),
        (torch.randn(4, 2, 3, 3), torch.eye(18), "K = 18 .* not divisible by group_size 4"),
        (torch.randn(4, 8, 2), torch.eye(16), "expected a Linear"),
        (torch.full((4, 8), float("nan")), torch.eye(8), "weight contains NaN or inf"),
        (torch.randn(4, 8), torch.eye(8) * float("inf"), "hessian contains NaN or inf"),
        (torch.randn(4, 8), torch.zeros(8, 8), "no positive diagonal mass"),
    ],
)
def test_bad_input_is_named(weight, hessian, message):
    with pytest.raises(ValueError, match=message):
        avq.quantize_weight(weight, hessian, SPEC)


def test_bad_types():
    with pytest.raises(TypeError, match="spec must be an avq.QuantSpec"):
        avq.quantize_weight(torch.randn(4, 8), torch.eye(8), {"num_codebooks": 1})
    with pytest.raises(TypeError, match="hessian must be a torch.Tensor"):
        avq.quantize_weight(torch.randn(4, 8), [[1.0]], SPEC)
    with pytest.raises(ValueError, match="beam_width must be >= 1"):
        avq.quantize_weight(torch.randn(4, 8), torch.eye(8), SPEC, beam_width=0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'beamwidth'"):
        avq.quantize_weight(torch.randn(4, 8), torch.eye(8), SPEC, beamwidth=2)


@pytest.mark.parametrize("kind", ["singular", "indefinite"])
def test_degenerate_hessian_is_damped_and_logged(kind, caplog):
    W, _ = correlated_layer(8, 16, seed=10)
    X = torch.randn(4, 16)  # 4 samples for K = 16: rank 4
    H = X.T @ X
    if kind == "indefinite":
        H = H - 0.05 * H.diagonal().mean() * torch.eye(16)
    with caplog.at_level(logging.WARNING, logger="avq"):
        q = avq.quantize_weight(W, H, SPEC, max_rounds=1, name="down.0.conv")
    assert "down.0.conv: hessian is singular or not positive semi-definite; damped" in caplog.text
    assert torch.isfinite(q.dequantize()).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_shapes():
    W, H = correlated_layer(32, 64, seed=11)
    q = avq.quantize_weight(W.cuda(), H.cuda(), avq.QuantSpec(2, 8, 8), max_rounds=3)
    assert q.codes.device.type == "cpu" and q.info["relative_error"] < 0.2


def test_dead_inputs_are_decoupled_without_global_damping(caplog):
    W, H = correlated_layer(16, 16, seed=12)
    H[3, :] = H[:, 3] = 0  # input 3 was always zero
    with caplog.at_level(logging.WARNING, logger="avq"):
        q = avq.quantize_weight(W, H, SPEC, max_rounds=2)
    assert "damped" not in caplog.text
    assert q.info["relative_error"] < 0.5


def test_error_is_reported_against_the_callers_hessian():
    # A rank-4 Hessian gets damped for the solver; the reported error must still be on the caller's H.
    W, _ = correlated_layer(32, 16, seed=13)
    X = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    H = X.T @ X
    q = avq.quantize_weight(W, H, avq.QuantSpec(1, 6, 4), max_rounds=2)
    # The solver reports on its own float32 copy (scaled, diagonal put back), hence 1e-4; the damped
    # Hessian's figure is 12 % off here.
    reported = q.info["relative_error"]
    assert reported == pytest.approx(avq.relative_error(W, q.dequantize(), H), rel=1e-4)
    damped = avq.relative_error(W, q.dequantize(), avq.prepare_hessian(H, 16))
    assert abs(damped - reported) > 100 * abs(reported - avq.relative_error(W, q.dequantize(), H))


def test_sequential_init_with_identity_hessian_is_nearest_codeword():
    # H = I: no coupling between inputs, so the error feedback moves nothing and each group gets the
    # codeword nearest to it in L2, which is k-means' assignment.
    spec = avq.QuantSpec(1, 6, 4)
    W, _ = correlated_layer(32, 16, seed=3)
    solver, codes, codebooks, scales = solver_state(W, torch.eye(16), spec)
    solver.H = torch.eye(16)  # undamped
    sequential = solver.sequential_codes(codes, codebooks, scales)
    assert torch.equal(sequential, codes)


def test_sequential_init_beats_kmeans_init_and_gptq_on_correlated_inputs():
    # Strongly correlated inputs (fast-decaying spectrum), like a trained conv's: nearest-codeword codes
    # ignore H and the alternating rounds do not escape them; GPTQ-style error feedback does.
    g = torch.Generator().manual_seed(5)
    out, K = 64, 64
    W = torch.randn(out, K, generator=g)
    U, _ = torch.linalg.qr(torch.randn(K, K, generator=g))
    X = torch.randn(1024, K, generator=g) / torch.arange(1, K + 1).float() @ U.T
    H = X.T @ X / 1024
    spec = avq.QuantSpec(1, 8, 4)
    kmeans = avq.quantize_weight(W, H, spec, init="kmeans").info["relative_error"]
    sequential = avq.quantize_weight(W, H, spec).info["relative_error"]
    gptq = avq.quantize_weight_gptq(W, H, 2).info["relative_error"]
    assert sequential < 0.9 * kmeans
    assert sequential < gptq


def test_unknown_init_is_named():
    with pytest.raises(ValueError, match="init must be one of"):
        SolverOptions(init="random")
