"""The README's `digits-t2i` grids, FP and W2A8, made by the `avq` command line exactly as a user runs it.

    python benchmarks/t2i_grids.py --threads 2           # ~10 min on 2 CPU cores (the quantization)

Writes the prompt files (`benchmarks/results/t2i_prompts_train.txt`: the calibration phrasings;
`t2i_prompts_held_out.txt`: one held-out phrasing per row, the digits 0-9 across), then runs

    avq quantize --model digits-t2i --preset w2a8 --prompts t2i_prompts_train.txt --steps 20 --guidance 2
                 --out Q
    avq sample --model digits-t2i --prompts t2i_prompts_held_out.txt --steps 20 --guidance 2 --seed 0 --out FP
    avq sample --quantized Q --prompts t2i_prompts_held_out.txt --steps 20 --guidance 2 --seed 0 --out W2

and copies the two grids to `t2i_grid_fp.png` / `t2i_grid_w2a8.png` (rows: phrasings, columns: digits;
identical noise), with `t2i_grids.json` (the commands, the quantization summary, the prompt alignment of
the 40 samples). The same commands reproduce the grids anywhere.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from avq.cli import main as avq_main
from avq.evaluation.samples import load_samples
from avq.storage.atomic import write_atomic
from avq_bench import t2i
from avq_bench.classifier import accuracy, load_classifier
from avq_bench.results import default_results_dir, write_results

PROTOCOL = ["--steps", str(t2i.STEPS), "--guidance", f"{t2i.GUIDANCE:g}"]


def _write_lines(path: Path, lines: list[str]) -> None:
    write_atomic(path, lambda handle: handle.write(("\n".join(lines) + "\n").encode()))


def _alignment(samples_npz: Path, digits: torch.Tensor) -> float:
    """Prompt alignment: the share of samples the digit classifier reads as the prompted digit."""
    images, _, _ = load_samples(samples_npz)
    return accuracy(load_classifier(), images, digits)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--results-dir", type=Path, default=None, help="default benchmarks/results")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = args.results_dir or default_results_dir()
    results.mkdir(parents=True, exist_ok=True)
    train, held_out = results / "t2i_prompts_train.txt", results / "t2i_prompts_held_out.txt"
    _write_lines(train, [c for c, _ in t2i.prompts("train")])
    pairs = t2i.prompt_set("held_out", 10 * len(t2i.HELD_OUT_TEMPLATES))  # row r: template r, digits 0-9
    _write_lines(held_out, [c for c, _ in pairs])
    digits = torch.tensor([d for _, d in pairs])
    row: dict = {"model": t2i.NAME, "digits": digits.tolist()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        commands = {
            "quantize": ["quantize", "--model", t2i.NAME, "--preset", "w2a8", "--prompts", str(train),
                         *PROTOCOL, "--out", str(tmp / "q"), "--json", str(tmp / "q.json")],
            "fp": ["sample", "--model", t2i.NAME, "--prompts", str(held_out), *PROTOCOL, "--seed", "0",
                   "--out", str(tmp / "fp")],
            "w2a8": ["sample", "--quantized", str(tmp / "q"), "--prompts", str(held_out), *PROTOCOL,
                     "--seed", "0", "--out", str(tmp / "w2a8")],
        }  # fmt: skip
        for command in commands.values():
            print("avq " + " ".join(command), flush=True)
            if avq_main(command) != 0:
                raise SystemExit(f"t2i_grids: `avq {' '.join(command)}` failed")
        figures = json.loads((tmp / "q.json").read_text())
        row["quantize"] = {"seconds": figures["seconds"], **figures["summary"]}
        for name in ("fp", "w2a8"):
            row[f"prompt_alignment_{name}"] = _alignment(tmp / name / "samples.npz", digits)
            shutil.copyfile(tmp / name / "samples.png", results / f"t2i_grid_{name}.png")
        repo = str(Path(__file__).resolve().parent.parent) + "/"  # commands as run from the repository root
        row["commands"] = {
            k: "avq " + " ".join(v).replace(str(tmp) + "/", "").replace(repo, "") for k, v in commands.items()
        }
    path = write_results("t2i_grids", [row], results_dir=results)
    fp, w2 = row["prompt_alignment_fp"], row["prompt_alignment_w2a8"]
    print(f"wrote {path}: prompt alignment FP {fp:.3f}, W2A8 {w2:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
