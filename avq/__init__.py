"""avq: additive multi-codebook vector quantization for diffusion models."""

from .aq import SolverOptions, quantize_weight, relative_error
from .baselines import UniformQuantizedWeight, quantize_weight_gptq, quantize_weight_rtn
from .hessian import HessianAccumulator, prepare_hessian
from .modules import AQConv2d, AQLinear
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
    "__version__",
]
