"""Optional dependencies: a feature whose package is missing says which extra (or package) to install.

The core install is what compressing needs; tracking (`avq[track]`: wandb), text encoders (`avq[text]`:
transformers) and the reference benchmark (`avq_bench`, in `benchmarks/` of the repository, with
`avq[bench]`: scikit-learn, matplotlib) are installed on request.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtraError(ImportError):
    """A feature was used without the optional package it needs; the message names what to install."""


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import `module` for `feature`, or raise `MissingExtraError` naming `pip install "avq[extra]"`."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingExtraError(
            f"{feature} needs the package {module.split('.')[0]!r}, which is not installed: "
            f'pip install "avq[{extra}]"'
        ) from error


def require_bench(feature: str) -> ModuleType:
    """The reference benchmark package `avq_bench` (digit models, classifier, data) with its submodules
    loaded, or `MissingExtraError` saying how to install it."""
    try:
        bench = importlib.import_module("avq_bench")
        for sub in ("data", "metrics", "reference"):
            importlib.import_module(f"avq_bench.{sub}")
    except ImportError as error:
        raise MissingExtraError(
            f"{feature} needs the reference benchmark package avq_bench ({error}): from a clone of the "
            'repository, pip install -e "benchmarks" (make setup does)'
        ) from error
    return bench
