"""Storage: everything avq writes to disk.

- `atomic`: the one atomic writer (unique temporary name, fsync, rename), fsync and sha256 helpers;
- `checkpoint`: the one checkpoint layer (atomic, fsynced, pickle-free, fingerprinted);
- `serialization`: `save_quantized` / `load_quantized`, the avq model folder (docs/design.md, "Contracts").
"""
