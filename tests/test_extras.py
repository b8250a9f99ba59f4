"""The library without its extras: with wandb, scikit-learn, matplotlib, transformers and the benchmark
package unimportable, avq still quantizes a layer of a diffusers model, saves and loads it; the features
that need an extra say which one to install."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCKED = ("wandb", "sklearn", "matplotlib", "transformers", "avq_bench")

SCRIPT = textwrap.dedent(
    """
    import sys

    BLOCKED = {blocked!r}

    # None in sys.modules: `import X` raises ModuleNotFoundError and importlib.util.find_spec("X") is None,
    # exactly as for a package that is not installed.
    for name in BLOCKED:
        sys.modules[name] = None

    import torch
    from diffusers import UNet2DModel

    import avq
    import avq.cli
    import avq.finetune
    from avq.calibration import HessianAccumulator
    from avq.core.modules import AQModule, replace_module
    from avq.extras import MissingExtraError

    torch.manual_seed(0)
    model = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    ).eval()
    name = "down_blocks.1.resnets.0.conv1"
    layer = model.get_submodule(name)
    acc = HessianAccumulator(layer)
    handle = layer.register_forward_hook(acc.hook)
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([10, 200, 500, 900])
    with torch.no_grad():
        reference = model(x, t).sample
    handle.remove()
    spec = avq.QuantSpec(num_codebooks=1, nbits=4, group_size=4)
    q = avq.quantize_weight(layer.weight, acc.hessian, spec, max_rounds=2, kmeans_iters=2)
    replace_module(model, name, AQModule.from_layer(layer, q))
    folder = avq.save_quantized(model, sys.argv[1])
    loaded = avq.load_quantized(folder)
    assert isinstance(loaded.get_submodule(name), avq.AQConv2d)
    with torch.no_grad():
        a, b = model(x, t).sample, loaded(x, t).sample
    assert torch.equal(a, b), (a - b).abs().max()
    assert (a - reference).abs().max() > 0  # the layer really is quantized

    assert all(sys.modules[name] is None for name in BLOCKED)

    from avq.tracking import make_tracker
    try:
        make_tracker("wandb")
    except MissingExtraError as error:
        assert "avq[track]" in str(error), error
    else:
        raise AssertionError("make_tracker('wandb') worked without wandb")

    from avq.cli import main
    code = main(["quantize", "--model", "digits-unet", "--preset", "w4a16", "--out", sys.argv[1] + "-cli"])
    assert code == 2, code
    print("OK")
    """
)


def test_library_works_without_extras(tmp_path, capfd):
    script = SCRIPT.format(blocked=BLOCKED)
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "saved")], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("OK")
    # the shipped name needs the benchmark package, and the error says how to install it
    assert "avq_bench" in result.stderr and "pip install -e" in result.stderr, result.stderr
