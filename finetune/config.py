"""`FinetuneConfig`: everything that determines the result of a SeMI-PV run (one frozen dataclass).

Defaults are chosen to be cheap (fine-tuning `digits-unet` W2A8 must fit in about 30 minutes on 2 CPU
cores): 300 steps of 16 trajectory points (32 model rows with the null-label copies), a pool of 32 teacher
trajectories per epoch. Adam moves every element by about `lr` per step, so the shadow (V) rate is the
one that decides how many codes can move in a run. The P-step rates were raised 5-10x from first
guesses (1e-4 / 1e-5 / 1e-5) by measurement on `digits-unet` W2A8: at the small rates resetting every
moment on any code change ("all") won, because each reset restarts Adam's bias correction and acts as a
larger step. At these rates the ablation compares reset rules rather than effective step sizes
(`benchmarks/results/quality.json`, the `avq-pv*` rows).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

SEMI_MODES = ("selective", "none", "all")
V_METRICS = ("hessian", "l2")
TIMESTEP_SAMPLING = ("uniform", "stratified")

# Fields that change how a run is observed or interrupted, not its result: a checkpoint may be resumed
# with other values of these.
RUN_ONLY_FIELDS = ("checkpoint_every", "sample_every", "log_every")


@dataclass(frozen=True)
class FinetuneConfig:
    """Settings of `avq.finetune.finetune` (see the package docstring for the algorithm).

    Steps and data:
        steps: optimizer steps. batch_size: trajectory points `(x_t, t, condition)` per step over all
        ranks together (must be divisible by the number of ranks); with `distill_null` each point is
        also evaluated with the null condition, so the model sees `2 * batch_size` rows.
        trajectories_per_epoch: FP (teacher) DDIM trajectories sampled per epoch, new noise and labels
        each epoch; an epoch has `trajectories_per_epoch * sampling_steps // batch_size` steps.
        sampling_steps / guidance_scale: the teacher's DDIM sampler (classifier-free guidance), as in
        calibration. timestep_sampling: "uniform" (every trajectory point once per epoch, random order) or
        "stratified" (each batch spreads over the timesteps of the schedule). sampling_batch: trajectories
        per sampler batch (and the unit of work shared out among ranks). block_loss_weight: weight of
        the block-output matching term (0: model output only).
    P step (AdamW, `betas`, `weight_decay`): lr_codebooks, lr_scales, lr_fp (every parameter left in FP:
        norms, biases, embeddings, FP-kept layers). All rates follow `lr_factor` (linear warm-up over
        `warmup` steps, cosine decay to `min_lr_fraction`). grad_clip: global gradient-norm clip (None:
        off), over all trained tensors including the shadows.
    V step: lr_shadow: AdamW rate of the straight-through shadow weights, which live in the codebooks'
        units (a fraction of the row's scale per step; `avq.finetune.pv`); every `v_every` steps the codes
        are updated (0: never, the P-only ablation): at most `max_code_change` of each layer's groups (so
        at most that fraction of its codes) are re-encoded by beam search (`beam_width`) around the shadow
        target, in plain L2 (`v_metric="l2"`, the default: lower held-out loss in
        `benchmarks/results/v_step_ablation.json`) or in the metric of the layer's inputs on that step's batch
        (`"hessian"`), and changes are accepted, largest moves first, while
        `||W_new - W_old||_F <= trust_ratio * ||W_old||_F` per layer (None: no trust limit).
        semi: "selective" | "none" | "all" (`avq.finetune.semi`).
    Run only (a checkpoint may be resumed with other values): checkpoint_every (0: only at the end),
        sample_every (a grid of student samples to the tracker every N steps and at the end; 0: never),
        log_every (metrics to the tracker every N steps).
    """

    steps: int = 300
    batch_size: int = 16
    seed: int = 0
    # P step
    lr_codebooks: float = 5e-4
    lr_scales: float = 5e-5
    lr_fp: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup: int = 10
    min_lr_fraction: float = 0.1
    grad_clip: float | None = 1.0
    # V step
    lr_shadow: float = 1e-2
    v_every: int = 1
    max_code_change: float = 0.01
    trust_ratio: float | None = 0.01
    beam_width: int = 4
    v_metric: str = "l2"  # measured better than "hessian" (benchmarks/results/v_step_ablation.json)
    semi: str = "selective"
    # data (teacher trajectories)
    trajectories_per_epoch: int = 32
    sampling_steps: int = 20
    guidance_scale: float = 2.0
    timestep_sampling: str = "uniform"
    distill_null: bool = True
    sampling_batch: int = 16
    block_loss_weight: float = 0.0
    # run only
    checkpoint_every: int = 50
    sample_every: int = 0
    log_every: int = 1

    def __post_init__(self) -> None:
        def fail(name: str, rule: str) -> ValueError:
            return ValueError(f"FinetuneConfig.{name} must be {rule}, got {getattr(self, name)!r}")

        for name in ("steps", "batch_size", "beam_width", "trajectories_per_epoch"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise fail(name, "an int >= 1")
        for name in ("sampling_steps", "sampling_batch", "log_every"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise fail(name, "an int >= 1")
        for name in ("warmup", "checkpoint_every", "sample_every", "seed", "v_every"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise fail(name, "an int >= 0")
        for name in ("lr_codebooks", "lr_scales", "lr_fp", "lr_shadow", "weight_decay", "block_loss_weight"):
            value = getattr(self, name)
            if not (_is_number(value) and value >= 0):
                raise fail(name, "a finite number >= 0")
        if not (_is_number(self.min_lr_fraction) and 0 <= self.min_lr_fraction <= 1):
            raise fail("min_lr_fraction", "in [0, 1]")
        if len(self.betas) != 2 or not all(_is_number(b) and 0 <= b < 1 for b in self.betas):
            raise fail("betas", "two numbers in [0, 1)")
        if self.grad_clip is not None and not (_is_number(self.grad_clip) and self.grad_clip > 0):
            raise fail("grad_clip", "None or a number > 0")
        if not (_is_number(self.max_code_change) and 0 <= self.max_code_change <= 1):
            raise fail("max_code_change", "in [0, 1]")
        if self.trust_ratio is not None and not (_is_number(self.trust_ratio) and self.trust_ratio >= 0):
            raise fail("trust_ratio", "None or a number >= 0")
        if self.semi not in SEMI_MODES:
            raise fail("semi", f"one of {SEMI_MODES}")
        if self.v_metric not in V_METRICS:
            raise fail("v_metric", f"one of {V_METRICS}")
        if self.timestep_sampling not in TIMESTEP_SAMPLING:
            raise fail("timestep_sampling", f"one of {TIMESTEP_SAMPLING}")
        if not _is_number(self.guidance_scale):
            raise fail("guidance_scale", "a finite number")
        if self.points_per_epoch < self.batch_size:
            raise ValueError(
                f"FinetuneConfig: an epoch holds trajectories_per_epoch * sampling_steps = "
                f"{self.points_per_epoch} points, fewer than batch_size = {self.batch_size}"
            )

    # ------------------------------------------------------------------ derived
    @property
    def points_per_epoch(self) -> int:
        return self.trajectories_per_epoch * self.sampling_steps

    @property
    def steps_per_epoch(self) -> int:
        """Batches drawn from one epoch's pool of teacher trajectories (the remainder is dropped)."""
        return self.points_per_epoch // self.batch_size

    def lr_factor(self, step: int) -> float:
        """Multiplier of every learning rate at `step` (0-based): linear warm-up, then cosine decay."""
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        low = self.min_lr_fraction
        return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def learning_rates(self) -> dict[str, float]:
        """Base rate of each optimizer group (`codebooks`, `scales`, `fp`, `shadow`)."""
        return {
            "codebooks": self.lr_codebooks,
            "scales": self.lr_scales,
            "fp": self.lr_fp,
            "shadow": self.lr_shadow,
        }

    def is_v_step(self, step: int) -> bool:
        return self.v_every > 0 and (step + 1) % self.v_every == 0

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible form (tuples become lists)."""
        data = asdict(self)
        data["betas"] = list(self.betas)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinetuneConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown FinetuneConfig fields: {sorted(unknown)}")
        values = dict(data)
        if "betas" in values:
            values["betas"] = tuple(values["betas"])
        return cls(**values)

    def result_dict(self) -> dict[str, Any]:
        """`to_dict()` without the run-only fields: what a checkpoint must match to be resumed."""
        return {k: v for k, v in self.to_dict().items() if k not in RUN_ONLY_FIELDS}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class FinetuneError(ValueError):
    """A fine-tuning request that cannot be carried out as given (the message says what to change)."""
