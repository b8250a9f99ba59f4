"""avq: additive multi-codebook vector quantization for diffusion models."""

from avq.calibration.config import CalibrationConfig
from avq.calibration.hessian import HessianAccumulator
from avq.calibration.statistics import calibrate, quantizable_layers
from avq.core.aq import SolverOptions, quantize_weight, relative_error
from avq.core.baselines import UniformQuantizedWeight, quantize_weight_gptq, quantize_weight_rtn
from avq.core.hessian import prepare_hessian
from avq.core.modules import AQConv2d, AQLinear
from avq.core.qweight import QuantizedWeight
from avq.core.spec import QuantSpec
from avq.core.uniform_modules import UniformConv2d, UniformLinear
from avq.pipelines import load_pipeline, quantize_pipeline, save_pipeline
from avq.planning.presets import QuantizeConfig, preset_config
from avq.run.quantize import quantize
from avq.run.report import QuantizeReport
from avq.storage.diffusers_registry import register as _register_diffusers_backend
from avq.storage.serialization import load_quantized, save_quantized

__version__ = "0.1.0"

__all__ = [
    "HessianAccumulator",
    "QuantSpec",
    "QuantizedWeight",
    "SolverOptions",
    "prepare_hessian",
    "quantize_weight",
    "relative_error",
    "UniformQuantizedWeight",
    "quantize_weight_rtn",
    "quantize_weight_gptq",
    "AQLinear",
    "AQConv2d",
    "UniformLinear",
    "UniformConv2d",
    "save_quantized",
    "load_quantized",
    "CalibrationConfig",
    "calibrate",
    "quantizable_layers",
    "QuantizeConfig",
    "QuantizeReport",
    "preset_config",
    "quantize",
    "quantize_pipeline",
    "save_pipeline",
    "load_pipeline",
    "__version__",
]

_register_diffusers_backend()  # diffusers' from_pretrained loads avq folders (avq.storage.diffusers_registry)
