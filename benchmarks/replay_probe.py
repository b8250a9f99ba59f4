"""LAQ's whole-model probe replayed from the layer's block against the plain one: same errors, less time.

    python benchmarks/replay_probe.py                  # -> benchmarks/results/replay_probe_cpu.json
    python benchmarks/replay_probe.py --models sd3-24  # one model

Every quantizable layer of each model is probed once both ways (`avq.planning.replay_probe.ReplayProbe`
wrapping the plain `Probe`), swapped for a copy of itself with its weight perturbed by 1 % Gaussian noise
(fixed seed: what is measured is the probe, not a quantizer). Rows: seconds of probing all layers each way
(the replay's one-off recording and checks included), their ratio, the largest relative difference between
the two errors over the layers, and which blocks were replayed or probed whole.

Models: the shipped `digits-unet` and `digits-dit` with the default probe (8 samples, 5 kept timesteps of
the reference sampler), and `sd3-24`, an `SD3Transformer2DModel` with SD3-medium's 24 joint blocks at a
small width (random weights; probe: 4 recorded calls of 2 rows at 16x16 latents), since transformers are
where the replay pays.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn as nn

from avq.calibration.statistics import quantizable_layers
from avq.pipelines.calibration import RecordedProbe
from avq.planning.replay_probe import ReplayProbe
from avq.planning.sensitivity import SwapProbe, make_probe
from avq_bench.reference import load_reference
from avq_bench.results import write_results

MODELS = ("digits-unet", "digits-dit", "sd3-24")
NOISE = 0.01


def sd3_24(seed: int = 0) -> tuple[nn.Module, SwapProbe]:
    """SD3-medium's depth (24 joint blocks) at a small width, and a probe of recorded calls."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=32,
        pos_embed_max_size=16,
    ).eval()  # fmt: skip
    probe, gen = RecordedProbe(), torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for t in (950.0, 700.0, 400.0, 100.0):
            kwargs = {
                "hidden_states": torch.randn(2, 16, 16, 16, generator=gen),
                "encoder_hidden_states": torch.randn(2, 8, 32, generator=gen),
                "pooled_projections": torch.randn(2, 32, generator=gen),
                "timestep": torch.full((2,), t),
            }
            probe.calls.append(((), kwargs))
            probe.reference.append(model(**kwargs).sample.float())
    return model, probe


def build(name: str) -> tuple[nn.Module, SwapProbe]:
    if name == "sd3-24":
        return sd3_24()
    model = load_reference(name)
    return model, make_probe(model)


def perturbed(layer: nn.Module, seed: int) -> nn.Module:
    copy_ = copy.deepcopy(layer)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = copy_.weight
        w.add_(NOISE * w.abs().mean() * torch.randn(w.shape, generator=gen))
    return copy_


def measure(name: str) -> dict:
    model, probe = build(name)
    layers = quantizable_layers(model)
    swaps = {n: perturbed(model.get_submodule(n), i) for i, n in enumerate(layers)}
    replay = ReplayProbe(probe)
    seconds, errors = {}, {}
    for way, p in (("whole", probe), ("replay", replay)):
        start = time.perf_counter()
        errors[way] = [p.layer_error(model, n, swaps[n]) for n in layers]
        seconds[way] = time.perf_counter() - start
    diffs = [abs(a - b) / a for a, b in zip(errors["whole"], errors["replay"], strict=True) if a > 0]
    row = {
        "model": name,
        "layers": len(layers),
        "probe_inputs": probe.num_inputs,
        "whole_seconds": round(seconds["whole"], 3),
        "replay_seconds": round(seconds["replay"], 3),
        "speedup": round(seconds["whole"] / seconds["replay"], 3),
        "max_relative_difference": max(diffs, default=0.0),
        "blocks_replayed": replay.replayed,
        "blocks_probed_whole": replay.whole,
        "noise": NOISE,
        "threads": torch.get_num_threads(),
    }
    print(
        f"{name}: {len(layers)} layers, whole {seconds['whole']:.1f} s, replay {seconds['replay']:.1f} s "
        f"(x{row['speedup']:.2f}), largest error difference {row['max_relative_difference']:.1e}, "
        f"{len(replay.replayed)} blocks replayed, {len(replay.whole)} whole",
        flush=True,
    )
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--results-dir", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [measure(name) for name in args.models]
    print(write_results("replay_probe_cpu", rows, results_dir=args.results_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
