"""Evaluation: sample sets (`samples`: generate with the sampler, save/load `samples.npz` + grid) and the
metrics over them (`metrics`: FID/sFID from features, Inception Score, precision/recall, PSNR, SSIM).

The feature network for the reference benchmark (the digit classifier) lives in `avq_bench`.
"""
