"""Planning: which layers are quantized, with which spec.

- `presets`: `QuantizeConfig`, `preset_config` and the spec lists behind `w4a8`/`w2a8`/`w4a16`/`w2a16`;
- `plan`: the FP-keep rule and one `LayerPlan` per Linear/Conv2d;
- `sensitivity`: LAQ's per-layer effect on the model output (`make_probe`, `measure_sensitivity`);
- `budget`: LAQ's integer program, one option per layer under a total-bits budget (`choose_specs`).
"""

from avq.planning.budget import BudgetError, choose_specs
from avq.planning.plan import LayerPlan, plan_layer, plan_model
from avq.planning.presets import PRESETS, PresetError, QuantizeConfig, preset_config
from avq.planning.sensitivity import SensitivityTable, SensitivityTableError, measure_sensitivity

__all__ = [
    "PRESETS",
    "BudgetError",
    "LayerPlan",
    "PresetError",
    "QuantizeConfig",
    "SensitivityTable",
    "SensitivityTableError",
    "choose_specs",
    "measure_sensitivity",
    "plan_layer",
    "plan_model",
    "preset_config",
]
