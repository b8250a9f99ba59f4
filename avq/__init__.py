"""avq: additive multi-codebook vector quantization for diffusion models."""

from .aq import SolverOptions, quantize_weight, relative_error
from .hessian import HessianAccumulator, prepare_hessian
from .qweight import QuantizedWeight
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
    "__version__",
]
