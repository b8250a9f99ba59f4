"""Teacher trajectories from a pipeline's own sampling, for fine-tuning a quantized pipeline's denoiser.

The FP pipeline (the teacher) samples as its users run it, through `avq.pipelines.calibration`: its own
scheduler, default steps and guidance, its text encoders on real prompts (the calibration captions or
`--prompts`) and its own null input; every denoiser call of those trajectories is recorded, inputs and
output. A training point is one recorded call: the student is called with exactly the teacher's inputs
(latents, timestep, prompt embeddings, SDXL's added conditions, Flux's guidance and ids, ... and, with
classifier-free guidance, the conditional and null rows the pipeline batches together) and trained to
match its output. So whatever the family conditions on, the student sees it as in use.

Determinism: epoch `e` samples `trajectories_per_epoch` trajectories in pipeline calls of `sampling_batch`
prompts, from seed `stream_seed(seed, "train", e)` and the prompts from position `e *
trajectories_per_epoch` on; the order of its points comes from `stream_seed(seed, "order", e)`. A pool is a
pure function of `(teacher, config, epoch)`, so a resumed run rebuilds it. One point per step (its rows are
the call's `2 x sampling_batch` samples with guidance); one process (data parallel over pipelines is not
implemented).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn as nn

from avq.calibration.config import CalibrationConfig
from avq.distributed import DistContext
from avq.pipelines.calibration import PipelineSource, RecordedProbe, first_tensor, record_probe

from .config import FinetuneConfig, FinetuneError
from .data import stream_seed


class PipelineTeacherData:
    """The recorded denoiser call of every step, from the teacher pipeline's trajectories of its epoch."""

    def __init__(
        self,
        teacher_pipe: Any,
        config: FinetuneConfig,
        ctx: DistContext,
        sampling: CalibrationConfig | None = None,
    ):
        if ctx.world_size > 1:
            raise FinetuneError(
                "fine-tuning a pipeline runs on one process: data parallel over pipelines is not implemented"
            )
        self.source = PipelineSource(teacher_pipe, sampling)
        self.config = config
        self.pool: RecordedProbe | None = None
        self.pool_epoch = -1
        self.order: torch.Tensor | None = None
        self.pools_built = 0

    @property
    def points_per_epoch(self) -> int:
        calls = -(-self.config.trajectories_per_epoch // self.config.sampling_batch)
        return calls * self.source.config.num_steps

    def epoch_of(self, step: int) -> int:
        return step // self.points_per_epoch

    def epoch_sampling(self, epoch: int, stream: str = "train") -> CalibrationConfig:
        """The calls of `epoch`: its seed and prompts, every step recorded."""
        config = self.config
        return replace(
            self.source.config,
            num_samples=config.trajectories_per_epoch,
            batch_size=config.sampling_batch,
            num_timesteps_kept=None,
            seed=stream_seed(config.seed, stream, epoch) % 2**31,
        )

    def batch(self, step: int) -> tuple[tuple, dict, torch.Tensor]:
        """`(args, kwargs, teacher output)` of the recorded call that step `step` trains on."""
        epoch = self.epoch_of(step)
        if self.pool is None or self.pool_epoch != epoch:
            sampling = self.epoch_sampling(epoch)
            self.pool = record_probe(self.source, sampling, offset=epoch * self.config.trajectories_per_epoch)
            if len(self.pool.calls) != self.points_per_epoch:
                raise FinetuneError(
                    f"the teacher pipeline called its denoiser {len(self.pool.calls)} times for "
                    f"{self.points_per_epoch} expected points (one call per step)"
                )
            generator = torch.Generator().manual_seed(stream_seed(self.config.seed, "order", epoch))
            self.order = torch.randperm(len(self.pool.calls), generator=generator)
            self.pool_epoch = epoch
            self.pools_built += 1
        index = int(self.order[step % self.points_per_epoch])
        args, kwargs = self.pool.calls[index]
        return args, kwargs, self.pool.reference[index]

    def outputs(self, model: nn.Module, batch: tuple[tuple, dict, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        """`(model output, teacher output)` on the recorded call's inputs (all of its rows)."""
        args, kwargs, target = batch
        return first_tensor(model(*args, **kwargs)), target

    @torch.no_grad()
    def sample_grid(self, model: nn.Module, n: int = 4) -> torch.Tensor:
        """`n` images `[n, C, H, W]` in [-1, 1] of the pipeline with `model` as its denoiser, from fixed
        prompts and noise (the "sample" stream), so grids of successive steps are comparable."""
        import numpy as np

        pipe, name = self.source.pipe, self.source.name
        teacher = getattr(pipe, name)
        sampling = replace(self.epoch_sampling(0, "sample"), num_samples=n, batch_size=n)
        from avq.pipelines.calibration import batch_calls

        call = batch_calls(pipe, sampling)[0]
        call.kwargs["output_type"] = "np"
        setattr(pipe, name, model)
        try:
            images = pipe(**call.kwargs).images
        finally:
            setattr(pipe, name, teacher)
        return torch.from_numpy(np.asarray(images, dtype=np.float32)).permute(0, 3, 1, 2) * 2 - 1
