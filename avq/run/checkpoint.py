"""The quantize run's checkpoint: one file per finished layer, on the shared checkpoint layer.

Resume: with `checkpoint_dir`, each finished layer is written atomically (`layers/<name>.safetensors`,
then its row in `manifest.json`, the commit point; `avq.storage.checkpoint`), together with the latest
calibration pass's Hessians and the activation ranges, and a fingerprint of
the model (class, config, weights), the `QuantizeConfig` and the calibration settings; `resume=True`
applies the finished layers and continues with the rest, and a checkpoint of another model or config is
refused with `CheckpointError`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from avq.calibration.activations import ActQuantizer
from avq.calibration.config import CalibrationConfig
from avq.planning.presets import QuantizeConfig
from avq.storage.checkpoint import CheckpointError, CheckpointFolder, tensor_digest

MANIFEST_NAME = "manifest.json"


def fingerprint(model: nn.Module, config: QuantizeConfig, calibration: Any) -> str:
    """sha256 over the model class, config and weights, the QuantizeConfig and the calibration input
    (a `CalibrationConfig`, a calibration source's `to_dict()`, or the given Hessians)."""
    digest = hashlib.sha256()
    model_config = dict(getattr(model, "config", {}) or {})
    # Private keys are left out: e.g. diffusers' `_use_default_values` lists keys in set order, which
    # changes from one process to the next and would refuse every resume.
    model_config = {k: v for k, v in model_config.items() if not k.startswith("_")}
    digest.update(type(model).__name__.encode())
    digest.update(json.dumps(model_config, sort_keys=True, default=str).encode())
    for key, tensor in model.state_dict().items():
        digest.update(key.encode())
        tensor_digest(digest, tensor)
    options = config.to_dict()
    if config.bits_budget is None:  # how LAQ would measure does not change a run without a budget
        options = {k: v for k, v in options.items() if not k.startswith("laq_")}
    for key in ("laq_uniform", "laq_floor"):  # empty by default: runs from before them keep their fingerprint
        if not options.get(key):
            options.pop(key, None)
    if options.get("laq_probe") == "model":  # how runs from before the option measured
        options.pop("laq_probe")
    digest.update(json.dumps(options, sort_keys=True, default=str).encode())
    if isinstance(calibration, CalibrationConfig):
        calibration = calibration.to_dict()
    elif not (isinstance(calibration, dict) and "source" in calibration):  # ready Hessians
        for name in sorted(calibration):
            value = calibration[name]
            H = value[0] if isinstance(value, tuple) else value
            digest.update(name.encode())
            tensor_digest(digest, H)
        return digest.hexdigest()
    # A config or a calibration source's `to_dict()`; replayed passes give the same Hessians as sampled ones.
    calibration = {k: v for k, v in calibration.items() if k != "replay"}
    digest.update(json.dumps(calibration, sort_keys=True, default=str).encode())
    return digest.hexdigest()


class QuantizeCheckpoint:
    """`manifest.json` ({fingerprint, n_rows, rows, activations, laq, complete}), `hessians.safetensors`,
    `activations.safetensors`, `layers/<name>.safetensors`; tensors first, the manifest last."""

    def __init__(self, folder: Path, fp: str, resume: bool, *, writable: bool = True):
        """`writable=False`: another process (torchrun's main rank) writes it; this one only reads what
        was committed when it opened (finished layers, a pass's Hessians)."""
        self.store = CheckpointFolder(folder, MANIFEST_NAME)
        self.folder = Path(folder)
        self.writable = writable
        self.initial: dict[str, torch.Tensor] = {}
        if not writable:
            self.manifest = self.store.read_meta() if self.store.exists() else {"rows": {}, "n_rows": {}}
            if self.manifest.get("fingerprint", fp) != fp:
                raise CheckpointError(f"{folder} is a checkpoint of another model or configuration")
            if (self.folder / "hessians.safetensors").exists():  # the interrupted pass, as committed now
                self.initial = self.store.load_tensors("hessians.safetensors")
            return
        if self.store.exists():
            manifest = self.store.read_meta()
            if not resume:
                raise CheckpointError(
                    f"{folder} holds an unfinished run; resume it (resume=True / --resume) "
                    "or delete the folder"
                )
            if manifest.get("fingerprint") != fp:
                raise CheckpointError(
                    f"{folder} is a checkpoint of another model or configuration (fingerprint mismatch); "
                    "delete it or use the original model, preset, method and calibration settings"
                )
            self.manifest = manifest
        else:
            if folder.exists() and any(folder.iterdir()):
                raise CheckpointError(f"{folder} exists and is not an avq checkpoint; choose another folder")
            (folder / "layers").mkdir(parents=True, exist_ok=True)
            self.manifest = {"fingerprint": fp, "n_rows": {}, "rows": {}, "complete": False}
            self.commit()

    def commit(self) -> None:
        if self.writable:
            self.store.write_meta(self.manifest)

    @property
    def done(self) -> dict[str, dict]:
        return self.manifest["rows"]

    def load_hessians(self, names: list[str]) -> dict[str, tuple[torch.Tensor, int]] | None:
        if not self.writable:  # the main rank may be replacing the file: only what was there at the start
            if not set(names) <= set(self.initial):
                return None
            return {n: (self.initial[n], int(self.manifest["n_rows"][n])) for n in names}
        if not (self.folder / "hessians.safetensors").exists():
            return None
        stored = self.store.load_tensors("hessians.safetensors")
        if not set(names) <= set(stored):
            return None
        return {n: (stored[n], int(self.manifest["n_rows"][n])) for n in names}

    def save_statistics(
        self, hessians: dict[str, tuple[torch.Tensor, int]], quantizers: dict[str, ActQuantizer]
    ) -> None:
        """The latest calibration's Hessians (replacing earlier ones) and all activation ranges so far."""
        if not self.writable:
            return
        if quantizers:  # before the manifest names them
            tensors = {f"{n}.{k}": t for n, q in quantizers.items() for k, t in q.state_dict().items()}
            self.store.save_tensors("activations.safetensors", tensors)
        self.store.save_tensors("hessians.safetensors", {n: h for n, (h, _) in hessians.items()})
        self.manifest["n_rows"] = {n: c for n, (_, c) in hessians.items()}
        self.manifest["activations"] = {n: q.to_entry() for n, q in quantizers.items()}
        self.commit()

    def load_quantizers(self) -> dict[str, ActQuantizer]:
        entries = self.manifest.get("activations") or {}
        if not entries:
            return {}
        stored = self.store.load_tensors("activations.safetensors")
        quantizers = {}
        for name, entry in entries.items():
            quantizer = ActQuantizer.from_entry(entry)
            quantizer.load_state_dict({k: stored[f"{name}.{k}"] for k in ("lo", "hi")})
            quantizers[name] = quantizer
        return quantizers

    def save_layer(self, name: str, row: dict, tensors: dict[str, torch.Tensor]) -> None:
        if not self.writable:
            return
        self.store.save_tensors(f"layers/{name}.safetensors", tensors)  # the tensors, then the manifest row
        self.manifest["rows"][name] = row
        self.commit()

    def load_layer(self, name: str) -> dict[str, torch.Tensor]:
        return self.store.load_tensors(f"layers/{name}.safetensors")

    def save_laq_measured(self, table: dict, seconds: float, block_gains: dict | None = None) -> None:
        """LAQ's sensitivity rows measured so far (`SensitivityTable.to_dict()` form), the wall time spent
        on them and the block probe's gains (`BlockProbe.gains`): a resume measures only the rest, the same
        way."""
        if not self.writable:
            return
        self.manifest["laq_measured"] = table
        self.manifest["laq_measure_seconds"] = seconds
        if block_gains is not None:
            self.manifest["laq_block_gains"] = block_gains
        self.commit()

    def save_laq(self, budget: dict) -> None:
        self.manifest["laq"] = budget
        self.commit()

    def finish(self) -> None:
        self.manifest["complete"] = True
        self.commit()
