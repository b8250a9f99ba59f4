"""`kill -9` during `avq finetune` on a shipped model, then `--resume`, against an uninterrupted run of the
same seed -> pv_resume.json.

    python benchmarks/pv_resume.py                                   # digits-unet W2A8, 40 steps
    python benchmarks/pv_resume.py --quantized runs/quality/digits-unet-avq-w2a8 --steps 40 --kill-after 20

Two `avq finetune` processes start side by side on the layer-wise AVQ save (`benchmarks/quality.py` keeps
it in `runs/quality/`), one thread each (a run is a deterministic function of the models, the config and
the thread count): one runs straight through; the other is sent SIGKILL at a random moment after its
checkpoint passes `--kill-after` steps, then resumed with `--resume`. The row records the step the
checkpoint held at the kill, the share of codes the V steps had changed by then (from that checkpoint's
history: a resume is only tested across code changes and SeMI resets if it is > 0; the run fails
otherwise), whether the two per-step histories and the two saved models are identical
(bit for bit), the held-out distillation loss of both, and the wall time of each part.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from sample_sets import REPO

import avq
from avq.finetune import FinetuneConfig, distillation_loss, heldout_pool
from avq_bench.reference import load_reference
from avq_bench.results import write_results

META = "checkpoint.json"  # avq.finetune.checkpoint.META_NAME


def _finetune_command(quantized: Path, out: Path, steps: int, every: int, resume: bool) -> list[str]:
    command = [sys.executable, "-m", "avq", "finetune", "--quantized", str(quantized), "--out", str(out)]
    command += ["--steps", str(steps), "--checkpoint-every", str(every), "--quiet", "--json", f"{out}.json"]
    return command + (["--resume"] if resume else [])


def _checkpoint_step(out: Path) -> int:
    meta = out.with_name(out.name + ".partial") / META
    return json.loads(meta.read_text())["step"] if meta.is_file() else 0  # replaced atomically: whole


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quantized", type=Path, default=REPO / "runs/quality/digits-unet-avq-w2a8")
    parser.add_argument("--model", default="digits-unet", help="the FP teacher (for the held-out loss)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--checkpoint-every", type=int, default=10)
    parser.add_argument("--kill-after", type=int, default=20, help="kill once the checkpoint holds this step")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random kill delay")
    parser.add_argument("--work", type=Path, default=REPO / "runs/pv_resume")
    args = parser.parse_args(argv)
    if not (args.quantized / "config.json").is_file():
        parser.error(f"{args.quantized} is not an avq save: run `benchmarks/quality.py --configs avq:w2a8`")
    if not 0 < args.kill_after < args.steps:
        parser.error("--kill-after must be between 0 and --steps")

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    straight, killed = args.work / "straight", args.work / "killed"

    def start(out: Path, resume: bool = False) -> subprocess.Popen:
        command = _finetune_command(args.quantized, out, args.steps, args.checkpoint_every, resume)
        return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    began = time.perf_counter()
    runs = {"straight": start(straight), "killed": start(killed)}
    victim = runs["killed"]
    while victim.poll() is None and _checkpoint_step(killed) < args.kill_after:
        time.sleep(0.05)
    if victim.poll() is not None:
        raise SystemExit(f"the run ended before it was killed:\n{victim.stderr.read().decode()[-2000:]}")
    time.sleep(random.Random(args.seed).uniform(0, 5))  # somewhere inside a step, not at a checkpoint
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at_seconds = time.perf_counter() - began
    step_at_kill = _checkpoint_step(killed)
    partial = killed.with_name(killed.name + ".partial")
    before_kill = json.loads((partial / META).read_text())["history"]
    changed_before_kill = sum(h["codes_changed"] for h in before_kill)
    leftovers = sorted(p.name for p in partial.iterdir())
    resumed = start(killed, resume=True)
    for name, process in (("straight", runs["straight"]), ("resumed", resumed)):
        if process.wait() != 0:
            raise SystemExit(f"{name} run failed:\n{process.stderr.read().decode()[-2000:]}")
    total_seconds = time.perf_counter() - began

    histories = [json.loads(Path(f"{out}.json").read_text())["history"] for out in (straight, killed)]
    models = [avq.load_quantized(out) for out in (straight, killed)]
    a, b = (m.state_dict() for m in models)
    teacher = load_reference(args.model).eval()
    pool = heldout_pool(teacher, FinetuneConfig(), trajectories=8)
    heldout = [distillation_loss(m.eval(), teacher, FinetuneConfig(), pool=pool) for m in models]
    row = {
        "model": args.model,
        "quantized": str(args.quantized),
        "steps": args.steps,
        "checkpoint_every": args.checkpoint_every,
        "threads": 1,
        "checkpoint_step_at_kill": step_at_kill,
        "codes_changed_before_kill": changed_before_kill,
        "resets_before_kill": sum(
            h.get("reset_groups", 0) + h.get("reset_codewords", 0) for h in before_kill
        ),
        "killed_after_seconds": round(killed_at_seconds, 1),
        "checkpoint_files_after_kill": leftovers,
        "histories_identical": histories[0] == histories[1],
        "models_bit_identical": a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a),
        "codes_changed_total": sum(h["codes_changed"] for h in histories[0]),
        "final_loss": histories[0][-1]["loss"],
        "heldout_loss_straight": heldout[0],
        "heldout_loss_resumed": heldout[1],
        "wall_seconds": round(total_seconds, 1),
    }
    print(json.dumps(row, indent=1))
    print(f"wrote {write_results('pv_resume', [row])}")
    if changed_before_kill == 0:
        print("no code had changed before the kill: this run does not test resuming across a V step")
        return 1
    return 0 if row["histories_identical"] and row["models_bit_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
