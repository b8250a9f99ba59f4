"""PV-Tuning with selective momentum invalidation (SeMI-PV): data-free fine-tuning of an avq-quantized
diffusion model against its FP teacher (installed as `avq.finetune`).

Layer-wise quantization leaves each layer's error uncorrected by the rest of the model and across
timesteps. Fine-tuning distills the FP model (the teacher) into the quantized one (the student) on the
teacher's own sampling trajectories, and trains both halves of the representation:

- P step (`pv`): AdamW on codebooks, scales and every parameter left in FP;
- V step (`pv`): straight-through update of the dequantized weights (a dense shadow per layer), then new
  codes for the groups that moved most, by beam search in L2, capped per step (`max_code_change`) and by
  a trust ratio on the weight change;
- SeMI (`semi`): when a group's codes change, the optimizer state that described the old discrete point
  (that group's shadow moments, and the moments of the codewords whose assignments changed) is reset, and
  nothing else; `semi="none"` / `"all"` are the ablations.

Modules: `config` (`FinetuneConfig`), `data` (teacher trajectories), `pv` (P/V steps), `semi` (resets),
`optim` (AdamW with per-slot resets), `checkpoint` (atomic, pickle-free, refuses another run's),
(torchrun: `avq.distributed`, gloo on CPU, NCCL on GPUs), `loop` (`finetune`, `distillation_loss`,
`heldout_pool`), `pipeline_data` (a pipeline's own trajectories), `folders` (`finetune_folder` behind
`avq finetune`, `finetune_pipeline`).

    from avq.finetune import FinetuneConfig, finetune
    student, history = finetune(student, teacher, FinetuneConfig(steps=300), checkpoint_dir="ckpt/")
"""

from .checkpoint import FinetuneCheckpointError
from .config import SEMI_MODES, FinetuneConfig, FinetuneError
from .folders import finetune_folder, finetune_pipeline
from .loop import HELDOUT_TRAJECTORIES, distillation_loss, finetune, heldout_pool
from .optim import SlotAdamW
from .pv import (
    LayerChange,
    ShadowLayer,
    make_shadows,
    metric_beam_search,
    normalised_metric,
    recording_metrics,
    straight_through,
    v_step,
)
from .semi import semi_reset, stale_codewords

__all__ = [
    "HELDOUT_TRAJECTORIES",
    "SEMI_MODES",
    "FinetuneCheckpointError",
    "FinetuneConfig",
    "FinetuneError",
    "LayerChange",
    "ShadowLayer",
    "SlotAdamW",
    "distillation_loss",
    "finetune",
    "finetune_folder",
    "finetune_pipeline",
    "heldout_pool",
    "metric_beam_search",
    "normalised_metric",
    "recording_metrics",
    "make_shadows",
    "semi_reset",
    "stale_codewords",
    "straight_through",
    "v_step",
]
