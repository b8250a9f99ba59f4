"""Real pipelines end to end: every family of `tiny_pipelines` (tiny random weights, real diffusers and
transformers classes, offline tokenizers) is quantized from its folder with `avq quantize`, sampled with
`avq sample`, loaded back with diffusers' own `DiffusionPipeline.from_pretrained` after `import avq`, and
generates on the same seed an output close to FP's at W4. Calibration is shown to follow the pipeline's
own scheduler and text encoders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_pipelines import FAMILIES, build_pipeline, call_kwargs, save_pipeline

import avq
import avq.planning.presets
from avq.calibration.config import CalibrationConfig
from avq.cli import main
from avq.core.modules import AQModule
from avq.pipelines.calibration import PipelineSource, record_probe
from avq.pipelines.folders import denoiser_name

PROMPTS = ["a red fox in the snow", "a lighthouse at night", "a bowl of soup", ""]


@pytest.fixture
def fast_solver(monkeypatch):
    """The presets with a 2-round solver: the tiny layers need no more, and CI time is short."""
    preset = avq.planning.presets.preset_config
    fast = avq.SolverOptions(max_rounds=2, kmeans_iters=4)
    monkeypatch.setattr(avq.planning.presets, "preset_config", lambda *a, **k: preset(*a, solver=fast, **k))


def _size_args(family: str) -> list[str]:
    kwargs = call_kwargs(family)
    args = []
    for key in ("height", "width"):
        if key in kwargs:
            args += [f"--{key}", str(kwargs[key])]
    return args


def _generate(pipe, family: str, seed: int = 0) -> np.ndarray:
    kwargs = dict(call_kwargs(family), output_type="np")
    out = pipe(**kwargs, generator=torch.Generator().manual_seed(seed))
    return np.asarray(out.images, dtype=np.float64)


@pytest.mark.parametrize("family", FAMILIES)
def test_quantize_sample_and_load_with_diffusers(family, tmp_path, fast_solver, capsys):
    from diffusers import DiffusionPipeline

    fp_folder = save_pipeline(family, tmp_path / "fp")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "q"
    tiny = ["--num-samples", "2", "--batch-size", "2", "--steps", "3", "--timesteps-kept", "2", "--quiet"]
    args = ["quantize", "--model", str(fp_folder), "--preset", "w4a8", "--out", str(out), "--device", "cpu"]
    if family == "dit":
        args += ["--classes", "1", "2"]
    elif family != "ldm":
        args += ["--prompts", str(prompts)]
    assert main(args + tiny + _size_args(family) + ["--json", str(tmp_path / "q.json")]) == 0, (
        capsys.readouterr()
    )
    figures = json.loads((tmp_path / "q.json").read_text())
    assert figures["summary"]["quantized"] > 0
    assert (out / "model_index.json").is_file()

    sample = ["sample", "--model", str(fp_folder), "--quantized", str(out), "--out", str(tmp_path / "s")]
    sample += ["--steps", "2", "--device", "cpu"] + _size_args(family)
    if family == "dit":
        sample += ["--classes", "1"]
    elif family != "ldm":
        sample += ["--prompt", "a cat"]
    assert main(sample) == 0, capsys.readouterr()
    assert (tmp_path / "s" / "samples.npz").is_file() and (tmp_path / "s" / "images" / "00000.png").is_file()

    fp = DiffusionPipeline.from_pretrained(fp_folder)
    quantized = DiffusionPipeline.from_pretrained(out)  # diffusers' own loader, avq registered on import
    name = denoiser_name(quantized)
    modules = [m for m in quantized.components[name].modules() if isinstance(m, AQModule)]
    assert modules, "the loaded denoiser holds no AQ modules"
    for component in quantized.components:  # every other component is the FP pipeline's
        if component != name and isinstance(quantized.components[component], torch.nn.Module):
            a, b = quantized.components[component].state_dict(), fp.components[component].state_dict()
            assert all(torch.equal(a[k], b[k]) for k in a), component
    fp.set_progress_bar_config(disable=True)
    quantized.set_progress_bar_config(disable=True)
    a, b = _generate(fp, family), _generate(quantized, family)
    relative = np.linalg.norm(a - b) / np.linalg.norm(a)
    assert relative < 0.1, f"{family}: W4A8 output differs from FP by {relative:.3f}"
    again = avq.load_pipeline(out)
    assert np.allclose(_generate(again, family), b, atol=1e-6)


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_calibration_follows_the_pipeline(family):
    """v-prediction (sd) and flow matching (sd3): the denoiser's recorded inputs are that scheduler's
    trajectory (each next latent is the scheduler's step from the recorded output) at its timesteps, with
    the text encoder's embeddings of the given prompts and of the empty prompt as the null input."""
    pipe = build_pipeline(family)
    pipe.set_progress_bar_config(disable=True)
    prompts = ("a red fox in the snow", "a lighthouse at night")
    config = CalibrationConfig(
        num_samples=2, batch_size=2, num_steps=3, num_timesteps_kept=None, prompts=prompts
    )
    size = {k: v for k, v in call_kwargs(family).items() if k in ("height", "width")}
    config = CalibrationConfig(**{**config.to_dict(), "prompts": prompts, **size})
    source = PipelineSource(pipe, config)
    probe = record_probe(source, source.config)
    assert len(probe.calls) == 3
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(3)
    if family == "sd":
        assert pipe.scheduler.config.prediction_type == "v_prediction"
        prompt_embeds, null_embeds = pipe.encode_prompt(list(prompts), "cpu", 1, True)
        timesteps = [args[1] if len(args) > 1 else kwargs["timestep"] for args, kwargs in probe.calls]
        assert [int(t) for t in timesteps] == [int(t) for t in scheduler.timesteps]
        hidden = probe.calls[0][1]["encoder_hidden_states"]  # [2n, L, D]: null rows, then the prompts
        torch.testing.assert_close(hidden[:2], null_embeds)
        torch.testing.assert_close(hidden[2:], prompt_embeds)
    else:
        assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
        prompt_embeds, null_embeds, pooled, null_pooled = pipe.encode_prompt(
            list(prompts), list(prompts), list(prompts), device="cpu", do_classifier_free_guidance=True
        )
        timesteps = [kwargs["timestep"][0] for _, kwargs in probe.calls]
        torch.testing.assert_close(torch.stack(timesteps).float(), scheduler.timesteps.float())
        hidden = probe.calls[0][1]["encoder_hidden_states"]
        torch.testing.assert_close(hidden[:2], null_embeds)
        torch.testing.assert_close(hidden[2:], prompt_embeds)
    guidance = source.config.guidance_scale
    for i in range(2):  # latents follow the scheduler: x_{i+1} = step(guided output_i, t_i, x_i)
        args, kwargs = probe.calls[i]
        x = (args[0] if args else kwargs["hidden_states"])[2:]  # the conditional rows
        out_null, out_cond = probe.reference[i].chunk(2)
        guided = out_null + guidance * (out_cond - out_null)
        expected = scheduler.step(guided, scheduler.timesteps[i], x).prev_sample
        args_next, kwargs_next = probe.calls[i + 1]
        x_next = (args_next[0] if args_next else kwargs_next["hidden_states"])[2:]
        torch.testing.assert_close(x_next, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_pipeline_passes_replay_the_recorded_denoiser_calls(family):
    """Calibrating a pipeline's denoiser in several passes: the first runs the pipeline, the others replay
    the denoiser calls it recorded at the kept steps, and the Hessians equal one pass's."""
    from avq.calibration.statistics import DenoiserCalls, quantizable_layers

    pipe = build_pipeline(family)
    pipe.set_progress_bar_config(disable=True)
    size = {k: v for k, v in call_kwargs(family).items() if k in ("height", "width")}
    config = CalibrationConfig(num_samples=2, batch_size=1, num_steps=3, num_timesteps_kept=2, **size)
    source = PipelineSource(pipe, config)
    names = quantizable_layers(source.denoiser)[:2]
    one = source.statistics(source.denoiser, names, observers={}, progress=False)
    calls, replay = [], DenoiserCalls()
    handle = source.denoiser.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        first = source.statistics(source.denoiser, names[:1], observers={}, progress=False, replay=replay)
        assert len(calls) == 2 * 3  # two pipeline calls of three steps
        second = source.statistics(source.denoiser, names[1:], observers={}, progress=False, replay=replay)
        assert len(calls) == 2 * 3 + 2 * 2  # then the two kept steps of each, replayed
    finally:
        handle.remove()
    for name, got in ((names[0], first), (names[1], second)):
        assert torch.equal(got[name][0], one[name][0]) and got[name][1] == one[name][1]


def test_pipeline_without_its_text_encoder_is_refused(tmp_path, capsys):
    import shutil

    folder = save_pipeline("sd", tmp_path / "fp")
    shutil.rmtree(folder / "text_encoder")
    capsys.readouterr()
    code = main(["quantize", "--model", str(folder), "--preset", "w4a8", "--out", str(tmp_path / "q")])
    err = capsys.readouterr().err
    assert code == 2 and "text_encoder/" in err and err.count("\n") == 1
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.partial").exists()


def test_empty_prompts_file_is_refused(tmp_path, capsys):
    folder = save_pipeline("sd", tmp_path / "fp")
    (tmp_path / "p.txt").write_text("\n\n")
    capsys.readouterr()
    args = ["quantize", "--model", str(folder), "--preset", "w4a8", "--out", str(tmp_path / "q")]
    code = main(args + ["--prompts", str(tmp_path / "p.txt")])
    err = capsys.readouterr().err
    assert code == 2 and "is empty" in err
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.partial").exists()


def test_cuda_device_without_cuda_is_refused(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    args = ["quantize", "--model", "digits-unet-mini", "--preset", "w4a8", "--out", str(tmp_path / "q")]
    code = main(args + ["--device", "cuda"])
    assert code == 2 and "CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_finetune_a_quantized_pipeline_resumes_bit_identical(tmp_path, fast_solver, capsys):
    """`avq finetune` on a quantized pipeline distills on the FP pipeline's own trajectories; a run stopped
    after 2 steps and resumed ends with the same saved denoiser as an uninterrupted one."""
    from avq.finetune import FinetuneConfig, finetune_folder
    from avq.storage.serialization import load_quantized

    fp_folder = save_pipeline("sd", tmp_path / "fp")
    tiny = ["--num-samples", "2", "--batch-size", "2", "--steps", "2", "--timesteps-kept", "2", "--quiet"]
    q = tmp_path / "q"
    args = ["quantize", "--model", str(fp_folder), "--preset", "w4a16", "--out", str(q), "--device", "cpu"]
    assert main(args + tiny + ["--height", "32", "--width", "32"]) == 0, capsys.readouterr()
    config = FinetuneConfig(steps=4, trajectories_per_epoch=2, sampling_batch=2, checkpoint_every=2, warmup=0)
    sampling = CalibrationConfig(num_steps=2, height=32, width=32, prompts=tuple(PROMPTS[:2]))
    common = dict(progress=False, device="cpu", sampling=sampling)
    straight = finetune_folder(q, tmp_path / "straight", config, **common)
    assert straight["saved"] and straight["steps_done"] == 4 and straight["teacher"] == str(fp_folder)
    assert straight["history"][0]["loss"] > 0
    stopped = finetune_folder(q, tmp_path / "resumed", config, stop_after=2, **common)
    assert not stopped["saved"] and stopped["steps_done"] == 2
    resumed = finetune_folder(q, tmp_path / "resumed", config, resume=True, **common)
    assert resumed["saved"]
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"]]
    a = load_quantized(tmp_path / "straight" / "unet").state_dict()
    b = load_quantized(tmp_path / "resumed" / "unet").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    before = load_quantized(q / "unet").state_dict()
    assert any(not torch.equal(a[k], before[k]) for k in a)  # it did train
    assert (tmp_path / "straight" / "model_index.json").is_file()


def test_hub_style_transformer2dmodel_and_pixart_128(tmp_path, fast_solver, capsys):
    """A DiT folder whose configs say `Transformer2DModel` (as hub DiT/PixArt folders do) loads through
    diffusers' own remapping and quantizes; PixArt at `sample_size=128` (resolution conditioning) too."""
    from diffusers import DiffusionPipeline

    dit = save_pipeline("dit", tmp_path / "dit")
    index = json.loads((dit / "model_index.json").read_text())
    index["transformer"] = ["diffusers", "Transformer2DModel"]
    (dit / "model_index.json").write_text(json.dumps(index))
    config = json.loads((dit / "transformer" / "config.json").read_text())
    (dit / "transformer" / "config.json").write_text(
        json.dumps({**config, "_class_name": "Transformer2DModel"})
    )
    pixart = tmp_path / "pixart"
    build_pipeline("pixart", sample_size=128).save_pretrained(pixart)
    tiny = ["--num-samples", "2", "--batch-size", "2", "--steps", "2", "--timesteps-kept", "2", "--quiet"]
    for folder, extra in ((dit, ["--classes", "3"]), (pixart, ["--height", "32", "--width", "32"])):
        out = tmp_path / f"{folder.name}-q"
        args = ["quantize", "--model", str(folder), "--preset", "w4a16", "--out", str(out), *tiny, *extra]
        assert main(args) == 0, capsys.readouterr().err
        pipe = DiffusionPipeline.from_pretrained(out)
        assert any(isinstance(m, AQModule) for m in pipe.transformer.modules())


def test_scheduler_the_calibration_cannot_drive_is_refused():
    from avq.pipelines.folders import PipelineError, check_pipeline

    pipe = build_pipeline("sd")

    class Frozen:  # a scheduler object without step(): nothing to count steps by
        config = pipe.scheduler.config

        def set_timesteps(self, n):
            pass

    pipe.scheduler = Frozen()
    with pytest.raises(PipelineError, match="cannot drive calibration"):
        check_pipeline(pipe)
    with pytest.raises(PipelineError, match="cannot drive calibration"):
        PipelineSource(pipe)


def test_sample_in_half_precision(tmp_path, capsys):
    folder = save_pipeline("sd", tmp_path / "fp")
    args = ["sample", "--model", str(folder), "--prompt", "a cat", "--steps", "2", "--height", "32"]
    args += ["--width", "32", "--dtype", "bfloat16", "--device", "cpu", "--out", str(tmp_path / "s")]
    assert main(args) == 0, capsys.readouterr().err
    assert (tmp_path / "s" / "images" / "00000.png").is_file()


def _tiny_calibration(family: str, **overrides) -> CalibrationConfig:
    size = {k: v for k, v in call_kwargs(family).items() if k in ("height", "width")}
    base = dict(num_samples=2, batch_size=2, num_steps=2, num_timesteps_kept=2, prompts=tuple(PROMPTS[:2]))
    return CalibrationConfig(**{**base, **size, **overrides})


def _fast(preset: str, **overrides):
    return avq.preset_config(preset, solver=avq.SolverOptions(max_rounds=2, kmeans_iters=4), **overrides)


def test_pipeline_resume_laq_and_sequential(tmp_path):
    """A pipeline through the Python API: an interrupted run resumes to the uninterrupted model; LAQ
    measures on probes recorded from the pipeline's own sampling; sequential calibration re-runs the
    pipeline on the partly quantized denoiser."""
    reference = avq.quantize_pipeline(
        build_pipeline("sd"), _fast("w4a8"), _tiny_calibration("sd"), progress=False
    )
    finished = []

    def stop_after_two(row: dict) -> None:
        finished.append(row["name"])
        if len(finished) == 2:
            raise KeyboardInterrupt

    ckpt = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        avq.quantize_pipeline(
            build_pipeline("sd"),
            _fast("w4a8"),
            _tiny_calibration("sd"),
            checkpoint_dir=ckpt,
            on_layer=stop_after_two,
            progress=False,
        )
    resumed = avq.quantize_pipeline(
        build_pipeline("sd"),
        _fast("w4a8"),
        _tiny_calibration("sd"),
        checkpoint_dir=ckpt,
        resume=True,
        progress=False,
    )
    a, b = reference.unet.state_dict(), resumed.unet.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    report = avq.QuantizeReport()
    laq = avq.quantize_pipeline(  # flux: a transformer, and few layers to measure
        build_pipeline("flux"),
        _fast("w2a16", bits_budget=4.0),
        _tiny_calibration("flux"),
        report=report,
        progress=False,
    )
    assert report.budget is not None and report.budget["total_bits"] <= 4.0 + 1e-9
    errors = [
        e["error"] for opts in report.budget["sensitivity"].values() for k, e in opts.items() if k != "fp"
    ]
    assert errors and all(e >= 0 for e in errors) and any(e > 0 for e in errors)
    assert any(isinstance(m, AQModule) for m in laq.transformer.modules())

    report = avq.QuantizeReport()
    avq.quantize_pipeline(
        build_pipeline("sd"),
        _fast("w4a8", sequential=True),
        _tiny_calibration("sd"),
        report=report,
        progress=False,
    )
    assert any(note.startswith("sequential:") for note in report.notes)
