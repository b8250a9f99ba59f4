"""`avq.evaluation.metrics`: each metric against its closed form or its defining property."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from avq.evaluation.metrics import (
    class_accuracy,
    fid,
    frechet_distance,
    inception_score,
    precision_recall,
    psnr,
    ssim,
)


def test_fid_of_identical_sets_is_zero():
    feats = np.random.default_rng(0).normal(size=(500, 16))
    assert abs(fid(feats, feats)) < 1e-6


def test_frechet_distance_of_diagonal_gaussians_matches_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    s1, s2 = rng.uniform(0.1, 3.0, size=8), rng.uniform(0.1, 3.0, size=8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_full_covariances_matches_1d_and_rotation_invariance():
    # 1-D: (m1 - m2)^2 + (sd1 - sd2)^2.
    assert frechet_distance([0.0], [[4.0]], [1.0], [[1.0]]) == pytest.approx(1.0 + 1.0)
    # A common rotation of both Gaussians leaves the distance unchanged.
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = a @ a.T + np.eye(6), b @ b.T + np.eye(6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    d = frechet_distance(mu1, s1, mu2, s2)
    d_rot = frechet_distance(q @ mu1, q @ s1 @ q.T, q @ mu2, q @ s2 @ q.T)
    assert d == pytest.approx(d_rot, rel=1e-8)
    assert d > 0


def test_fid_handles_singular_covariances():
    # Fewer samples than dimensions and a constant feature: rank-deficient covariances stay finite.
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(20, 40)), rng.normal(size=(20, 40)) + 0.5
    a[:, 0] = b[:, 0] = 1.0
    value = fid(a, b)
    assert math.isfinite(value) and value > 0


@pytest.mark.parametrize("samples", [400, 30])  # full-rank covariances, and fewer samples than features
def test_frechet_distance_equals_the_sqrtm_formula(samples):
    """The symmetric-eigendecomposition trace equals pytorch-fid's `tr sqrtm(s1 s2)` (scipy, Schur form)."""
    from scipy import linalg

    rng = np.random.default_rng(4)
    mix = rng.normal(size=(64, 64))
    a = rng.normal(size=(samples, 64)) @ mix
    b = rng.normal(size=(samples, 64)) @ (mix + 0.3 * rng.normal(size=(64, 64))) + 0.2
    mu1, mu2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("samples", [(500, 400), (30, 45)])  # more samples than features, and fewer
def test_fid_of_features_equals_the_distance_of_their_statistics(samples):
    """`fid` takes the sample-space route (nuclear norm) with fewer samples than features: the same value
    as `frechet_distance` of the covariances."""
    rng = np.random.default_rng(5)
    mix = rng.normal(size=(64, 64))
    a, b = rng.normal(size=(samples[0], 64)) @ mix, rng.normal(size=(samples[1], 64)) @ mix.T + 0.1
    expected = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert fid(a, b) == pytest.approx(expected, rel=1e-7)  # the [D, D] route rounds near-zero eigenvalues
    with pytest.raises(ValueError, match="features"):
        fid(a, b[:, :10])


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_inception_score_bounds():
    uniform = np.full((100, 10), 0.1)
    assert inception_score(uniform, splits=5)[0] == pytest.approx(1.0)
    confident = np.eye(10)[np.arange(100) % 10]  # one-hot, balanced within every split
    mean, std = inception_score(confident, splits=10)
    assert mean == pytest.approx(10.0) and std == pytest.approx(0.0, abs=1e-12)
    one_class = np.eye(10)[np.zeros(100, dtype=int)]  # confident but collapsed
    assert inception_score(one_class, splits=1)[0] == pytest.approx(1.0)


def test_precision_recall_identical_and_disjoint_sets():
    feats = np.random.default_rng(4).normal(size=(200, 8))
    assert precision_recall(feats, feats, k=3) == (1.0, 1.0)
    far = feats + 100.0
    assert precision_recall(feats, far, k=3) == (0.0, 0.0)


def test_precision_recall_of_a_collapsed_generator():
    # Fakes all near one real point: high precision, low recall.
    rng = np.random.default_rng(5)
    real = rng.normal(size=(300, 4))
    fake = real[0] + 0.001 * rng.normal(size=(300, 4))
    precision, recall = precision_recall(real, fake, k=3)
    assert precision == 1.0 and recall < 0.05


def test_class_accuracy():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 1.0], [0.0, 1.0]])
    assert class_accuracy(logits, torch.tensor([0, 1, 1, 1])) == 0.75


def test_psnr_identical_is_inf_and_known_noise_matches_formula():
    x = torch.rand(4, 1, 16, 16, dtype=torch.float64) * 2 - 1
    assert psnr(x, x) == math.inf
    # Constant offset 0.1: MSE 0.01 on a data range of 2 -> 10 log10(4 / 0.01).
    assert psnr(x, x + 0.1) == pytest.approx(10 * math.log10(4 / 0.01), rel=1e-9)
    noise = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.05
    mse = noise.double().pow(2).flatten(1).mean(1)
    assert psnr(x, x + noise) == pytest.approx(float((10 * torch.log10(4 / mse)).mean()), rel=1e-9)


def test_ssim_is_one_for_identical_images_and_drops_with_noise():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 16, 16, generator=gen) * 2 - 1
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    noise = torch.randn(4, 1, 16, 16, generator=gen)
    values = [ssim(x, x + s * noise) for s in (0.01, 0.1, 0.5)]
    assert 1.0 > values[0] > values[1] > values[2]
    assert ssim(x, -x) < 0  # anti-correlated structure
    assert ssim(x, x + 0.1 * noise) == pytest.approx(ssim(x + 0.1 * noise, x))  # symmetric


def test_fidelity_metrics_reject_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        psnr(torch.zeros(2, 1, 16, 16), torch.zeros(3, 1, 16, 16))
