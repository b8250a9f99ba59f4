"""The quantize run: `quantize` (the loop), its checkpoint, its report, and LAQ's place in it.

- `quantize`: `quantize(model, config, calibration)`, the entry point behind `avq.quantize`;
- `checkpoint`: per-layer checkpoints and the run's fingerprint (resume);
- `report`: `QuantizeReport` (per-layer rows, notes, bit summary);
- `laq`: candidates, measuring and the budgeted choice, as the loop uses them.
"""
