"""The shipped digit classifier, `avq sample` and `avq eval` end to end (tiny sizes)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from avq.cli import main
from avq_bench.classifier import CLASSIFIER_DIR, accuracy, load_classifier
from avq_bench.data import load_digits_images

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--n", "10", "--steps", "2", "--batch-size", "5", "--quiet"]


def test_shipped_classifier_loads_offline_and_reaches_98_percent():
    model = load_classifier()
    assert not model.training
    images, labels = load_digits_images("test")
    measured = accuracy(model, images, labels)
    assert measured >= 0.98
    recorded = json.loads((CLASSIFIER_DIR / "config.json").read_text())["training"]["test_accuracy"]
    assert measured == pytest.approx(recorded, abs=1e-6)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert weights < 1_000_000
    pooled, spatial = model.features(images[:3])
    assert pooled.shape == (3, model.config.channels[-1])
    assert spatial.shape == (3, model.config.spatial_channels * 8 * 8)


def test_load_classifier_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_classifier"):
        load_classifier(tmp_path)


@pytest.fixture(scope="module")
def sample_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("samples")
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert (
            main(
                [
                    "sample",
                    "--model",
                    "digits-unet-mini",
                    "--seed",
                    str(seed),
                    "--out",
                    str(root / name),
                    *TINY,
                ]
            )
            == 0
        )
    return root


def test_sample_is_reproducible_and_balanced(sample_sets):
    a, b, c = (np.load(sample_sets / n / "samples.npz") for n in "abc")
    assert a["samples"].shape == (10, 1, 16, 16) and a["samples"].dtype == np.float32
    assert a["labels"].tolist() == [i % 10 for i in range(10)]
    assert np.array_equal(a["samples"], b["samples"])
    assert not np.allclose(a["samples"], c["samples"])
    assert a["samples"].min() >= -1 and a["samples"].max() <= 1
    assert json.loads(str(a["meta"]))["seed"] == 0
    assert (sample_sets / "a" / "samples.png").stat().st_size > 0


def test_eval_prints_and_writes_json(sample_sets, tmp_path, capsys):
    out = tmp_path / "figures.json"
    a, c = sample_sets / "a" / "samples.npz", sample_sets / "c" / "samples.npz"
    assert main(["eval", str(a), "--fp", str(a), "--floor", str(c), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "FID" in text and "floor" in text and "PSNR" in text
    figures = json.loads(out.read_text())
    for key in ("fid", "sfid", "is", "precision", "recall", "class_accuracy", "ssim", "fid_floor"):
        assert isinstance(figures[key], float), key
    assert figures["psnr"] is None  # identical to FP: inf, which JSON cannot hold
    assert figures["ssim"] == pytest.approx(1.0)
    assert figures["fid_to_fp"] == pytest.approx(0.0, abs=1e-3)  # N=10: rank-deficient, sqrtm round-off
    assert figures["n_samples"] == 10 and figures["reference"] == "test"


def _expect_error(argv, capsys, match):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1


def test_bad_inputs_exit_2(sample_sets, tmp_path, capsys):
    a = str(sample_sets / "a" / "samples.npz")
    _expect_error(["eval", str(tmp_path / "missing.npz")], capsys, "no such samples file")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip")
    _expect_error(["eval", str(garbage)], capsys, "not a readable .npz")
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, images=np.zeros((4, 1, 16, 16), np.float32))
    _expect_error(["eval", str(wrong)], capsys, "missing ['labels', 'samples']")
    small = tmp_path / "small.npz"
    np.savez(small, samples=np.zeros((4, 1, 16, 16), np.float32), labels=np.zeros(4, np.int64))
    _expect_error(["eval", a, "--fp", str(small)], capsys, "differs from the samples")
    _expect_error(
        ["sample", "--model", "no-such-model", "--out", str(tmp_path / "o"), *TINY], capsys, "unknown model"
    )


def test_sample_from_quantized_folder(tmp_path, capsys):
    """A missing --quantized folder is a one-line error (loading itself: avq.load_quantized's tests)."""
    _expect_error(
        ["sample", "--quantized", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), *TINY],
        capsys,
        "not found",
    )


def test_eval_any_images_psnr_and_inception_fid(tmp_path, capsys):
    """RGB images of any size: PSNR/SSIM to FP; FID with an Inception weights file (safetensors, here
    random weights of the right architecture); identical sets have FID 0; a foreign file is refused."""
    from safetensors.torch import save_file

    from avq.evaluation.inception import FIDInception
    from avq.evaluation.samples import save_samples

    torch.manual_seed(0)
    # the architecture of FID's Inception-v3: torchvision's parameter count without the aux head and fc
    network = FIDInception()
    assert sum(p.numel() for p in network.parameters()) == 21_785_568
    weights = tmp_path / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(weights))
    fp = torch.rand(3, 3, 24, 40) * 2 - 1
    noisy = (fp + 0.1 * torch.randn_like(fp)).clamp(-1, 1)
    labels = torch.full((3,), -1)
    for name, images in (("fp", fp), ("q", noisy), ("fp2", torch.rand(3, 3, 24, 40) * 2 - 1)):
        save_samples(tmp_path / name, images, labels, {})
    figures = tmp_path / "f.json"
    args = ["eval", str(tmp_path / "q" / "samples.npz"), "--fp", str(tmp_path / "fp" / "samples.npz")]
    assert main(args + ["--json", str(figures)]) == 0
    data = json.loads(figures.read_text())
    assert 15 < data["psnr"] < 30 and 0 < data["ssim"] < 1 and "fid_to_fp" not in data
    full = args + ["--inception", str(weights), "--floor", str(tmp_path / "fp2" / "samples.npz")]
    assert main(full + ["--real", str(tmp_path / "fp" / "samples.npz"), "--json", str(figures)]) == 0
    data = json.loads(figures.read_text())
    assert data["fid_to_fp"] == pytest.approx(data["fid"]) and data["fid_to_fp"] > 0 and data["fid_floor"] > 0
    same = ["eval", str(tmp_path / "fp" / "samples.npz"), "--fp", str(tmp_path / "fp" / "samples.npz")]
    assert main(same + ["--inception", str(weights), "--json", str(figures)]) == 0
    assert json.loads(figures.read_text())["fid_to_fp"] == pytest.approx(0, abs=1e-6)
    save_file({"fc.weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    capsys.readouterr()
    assert main(args + ["--inception", str(tmp_path / "other.safetensors")]) == 2
    assert "not FID's Inception-v3 weights" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "q" / "samples.npz")]) == 2  # no --fp, no FID network
