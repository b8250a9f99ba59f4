"""The reference benchmark's evaluation: the metrics of `avq.evaluation.metrics` on the features of the
shipped digit classifier, against the real digits test split (docs/design.md, "Reference benchmark")."""

from __future__ import annotations

import torch

from avq.evaluation.metrics import class_accuracy, fid, inception_score, precision_recall, psnr, ssim


@torch.no_grad()
def classifier_outputs(classifier, images: torch.Tensor, batch_size: int = 500) -> dict[str, torch.Tensor]:
    """Pooled features, spatial features and softmax probabilities of `images` [N, 1, 16, 16], batched."""
    pooled, spatial, probs = [], [], []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].float()
        p, s = classifier.features(x)
        pooled.append(p)
        spatial.append(s)
        probs.append(classifier.logits(x).softmax(dim=1))
    return {"pooled": torch.cat(pooled), "spatial": torch.cat(spatial), "probs": torch.cat(probs)}


def evaluate(
    samples: torch.Tensor,
    labels: torch.Tensor,
    *,
    reference: tuple[torch.Tensor, torch.Tensor] | None = None,
    fp_samples: torch.Tensor | None = None,
    floor_samples: torch.Tensor | None = None,
    classifier=None,
    is_splits: int = 10,
    k: int = 3,
) -> dict[str, float]:
    """All benchmark metrics of class-conditional `samples` [N, 1, 16, 16] in [-1, 1] with their intended
    `labels` [N], against `reference` real images and labels (default: the digits test split).

    Returns `fid`, `sfid` (pooled / spatial classifier features), `is`, `is_std` (`min(is_splits, N)`
    splits), `precision`, `recall` (k-NN manifolds on pooled features), `class_accuracy` (of the samples'
    intended labels), `reference_accuracy` (the classifier on the reference images: the ceiling), and,
    when `fp_samples` (same noise, FP model) are given, `psnr` and `ssim` to them and `fid_to_fp` /
    `sfid_to_fp`. `floor_samples` (FP samples of another seed) add `fid_floor` / `sfid_floor`: the FID
    between them and the FP samples (or `samples` when no `fp_samples`), i.e. what FID reads between two
    draws of the same model at this N, the floor below which no FID difference means anything.
    """
    from avq_bench.classifier import load_classifier
    from avq_bench.data import load_digits_images

    samples = torch.as_tensor(samples, dtype=torch.float32)
    labels = torch.as_tensor(labels, dtype=torch.int64)
    if samples.ndim != 4 or labels.shape != (samples.shape[0],):
        raise ValueError(
            f"samples [N, 1, H, W] and labels [N] expected, got {list(samples.shape)}, {list(labels.shape)}"
        )
    if reference is None:
        reference = load_digits_images("test")
    ref_images, ref_labels = (torch.as_tensor(t) for t in reference)
    classifier = classifier if classifier is not None else load_classifier()
    out_s = classifier_outputs(classifier, samples)
    out_r = classifier_outputs(classifier, ref_images)
    is_mean, is_std = inception_score(out_s["probs"], min(is_splits, len(samples)))
    precision, recall = precision_recall(out_r["pooled"], out_s["pooled"], k=k)
    figures = {
        "n_samples": len(samples),
        "n_reference": len(ref_images),
        "fid": fid(out_s["pooled"], out_r["pooled"]),
        "sfid": fid(out_s["spatial"], out_r["spatial"]),
        "is": is_mean,
        "is_std": is_std,
        "precision": precision,
        "recall": recall,
        "class_accuracy": class_accuracy(out_s["probs"], labels),
        "reference_accuracy": class_accuracy(out_r["probs"], ref_labels),
    }
    if fp_samples is not None:
        fp_samples = torch.as_tensor(fp_samples, dtype=torch.float32)
        if fp_samples.shape != samples.shape:
            raise ValueError(
                f"fp_samples shape {list(fp_samples.shape)} != samples shape {list(samples.shape)}"
            )
        out_fp = classifier_outputs(classifier, fp_samples)
        figures["fid_to_fp"] = fid(out_s["pooled"], out_fp["pooled"])
        figures["sfid_to_fp"] = fid(out_s["spatial"], out_fp["spatial"])
        figures["psnr"] = psnr(samples, fp_samples)
        figures["ssim"] = ssim(samples, fp_samples)
    if floor_samples is not None:
        floor_samples = torch.as_tensor(floor_samples, dtype=torch.float32)
        if floor_samples.ndim != 4 or floor_samples.shape[1:] != samples.shape[1:]:
            raise ValueError(f"floor_samples shape {list(floor_samples.shape)} does not match samples")
        base = out_fp if fp_samples is not None else out_s
        out_floor = classifier_outputs(classifier, floor_samples)
        figures["fid_floor"] = fid(base["pooled"], out_floor["pooled"])
        figures["sfid_floor"] = fid(base["spatial"], out_floor["spatial"])
    return figures
