"""avq: additive multi-codebook vector quantization for diffusion models."""

from .aq import SolverOptions, quantize_weight, relative_error
from .baselines import UniformQuantizedWeight, quantize_weight_gptq, quantize_weight_rtn
from .calibration import CalibrationConfig, calibrate, quantizable_layers
from .hessian import HessianAccumulator, prepare_hessian
from .modules import AQConv2d, AQLinear
from .pipeline import QuantizeConfig, QuantizeReport, preset_config, quantize
from .qweight import QuantizedWeight
from .serialization import load_quantized, save_quantized
from .spec import QuantSpec

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
    "save_quantized",
    "load_quantized",
    "CalibrationConfig",
    "calibrate",
    "quantizable_layers",
    "QuantizeConfig",
    "QuantizeReport",
    "preset_config",
    "quantize",
    "__version__",
]
