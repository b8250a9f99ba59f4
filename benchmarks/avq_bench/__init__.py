"""avq's reference benchmark: the project's own digit models and everything that scores them.

Apart from the library (`avq`), so that the compressor's wheel carries no digit models. Installed from
the repository (`pip install -e benchmarks`; `make setup` does it).

- `data`: scikit-learn's handwritten digits at 16x16 in [-1, 1], splits and augmentation;
- `training`: the resumable trainer of `digits-unet` / `digits-dit` (on `avq.storage.checkpoint`);
- `reference`: the shipped models (`load_reference`, `asset_path`), class-conditional sampling, layers;
- `classifier`: the metric classifier whose features FID/sFID/IS use;
- `metrics`: `evaluate`, the benchmark's figures on those features (`avq.evaluation.metrics`);
- `results`: results files (`benchmarks/results/<name>.json`) with commit, command, device and date;
- `demo`: `python -m avq_bench.demo`, what `make demo` runs;
- `assets/`: the shipped models and the classifier (diffusers folders, fp16 safetensors).
"""
