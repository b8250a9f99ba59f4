"""Registering avq with diffusers: `register()` (called by `import avq`) adds "avq" to the two dicts of
`diffusers.quantizers.auto`, `AUTO_QUANTIZATION_CONFIG_MAPPING` and `AUTO_QUANTIZER_MAPPING`, so that
diffusers' `from_pretrained` loads avq folders through `avq.storage.diffusers_backend`. diffusers has no
public plug-in registry; `import avq` does not import diffusers (slow), so if that module is not imported
yet a one-shot import hook registers avq when it is."""

from __future__ import annotations

import importlib.abc
import logging
import sys
from typing import Any

from avq.storage import diffusers_backend as backend
from avq.storage.diffusers_backend import AUTO_MODULE, QUANT_METHOD

log = logging.getLogger("avq")


def register() -> None:
    """Make diffusers' `from_pretrained` load avq folders: add "avq" to `diffusers.quantizers.auto`'s
    `AUTO_QUANTIZATION_CONFIG_MAPPING` and `AUTO_QUANTIZER_MAPPING`. Idempotent; called by `import avq`.

    If diffusers has not imported that module yet, a one-shot import hook does it when it does (so this
    never imports diffusers itself)."""
    auto = sys.modules.get(AUTO_MODULE)
    if auto is not None and hasattr(auto, "AUTO_QUANTIZER_MAPPING"):
        _install(auto)
    elif not any(type(finder).__name__ == _RegisterOnImport.__name__ for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())


def is_registered() -> bool:
    """Whether diffusers (imported) maps "avq" to this backend."""
    auto = sys.modules.get(AUTO_MODULE)
    if auto is None or backend.built_classes() is None:
        return False
    config_cls, quantizer_cls = backend.built_classes()
    return (
        auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is config_cls
        and auto.AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is quantizer_cls
    )


def _install(auto: Any) -> None:
    config_cls, quantizer_cls = backend.backend_classes()
    for mapping, cls in (
        (auto.AUTO_QUANTIZATION_CONFIG_MAPPING, config_cls),
        (auto.AUTO_QUANTIZER_MAPPING, quantizer_cls),
    ):
        current = mapping.get(QUANT_METHOD)
        if current is None or current is cls or getattr(current, "__module__", None) == backend.__name__:
            mapping[QUANT_METHOD] = cls  # new, or ours (again, or from before a reload of this module)
        else:
            log.warning(
                "diffusers already maps quant_method %r to %s: avq's diffusers backend is not registered",
                QUANT_METHOD,
                current,
            )


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Import hook: when `diffusers.quantizers.auto` is imported, register avq right after it runs."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != AUTO_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


class _RegisteringLoader(importlib.abc.Loader):
    """Runs the real loader, then registers avq (also on `importlib.reload`); never breaks the import."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        try:
            _install(module)
        except Exception:  # e.g. diffusers renamed its base classes: loading avq folders fails, not diffusers
            log.exception("avq: could not register the avq quantization method with diffusers")

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, is_package, ...
        return getattr(self._loader, name)
