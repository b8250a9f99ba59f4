#!/usr/bin/env bash
# The GPU session's checks in one call (device machine: CUDA, no network, no .git, packages in the image
# but not diffusers / faiss-cpu, which travel as `.whl/site.tar.xz`). Run from the repository root with
# AVQ_SOURCE_COMMIT set to the commit the tree was copied from; results land in $OUT (default: /tmp/out).
#
#   here:   mkdir -p .whl && pip download --no-deps ... diffusers faiss-cpu (cp312) && unzip both into a
#           folder and `tar -cJf .whl/site.tar.xz -C folder .`   (xz keeps tracked tree + wheels < 64 MiB)
#   there:  AVQ_SOURCE_COMMIT=<sha> bash benchmarks/device_run.sh
#
# Stages, each under its own time limit so one failure does not cost the others:
#   1. scale.py --tiny on CUDA (a preflight of the quantize path, seconds)
#   2. the solver / hessian / kernel tests, compiled (no Triton interpreter)
#   3. solver_devices.py: one linear and one conv layer solved on CPU and CUDA, same seed
#   4. scale.py on the SD 1.5-shaped UNet: the same blocks as scale_cpu.json, time-limited
set -u
OUT=${OUT:-/tmp/out}
SCALE_SECONDS=${SCALE_SECONDS:-300}
mkdir -p "$OUT" /tmp/site
tar -xJf .whl/site.tar.xz -C /tmp/site || exit 1
# The package as pyproject lays it out (`avq.kernels` = kernels/, `avq.finetune` = finetune/), without pip:
# links inside this copy of the tree (the current directory comes first on `python -m`'s path).
ln -sfn ../kernels avq/kernels && ln -sfn ../finetune avq/finetune
export PYTHONPATH=/tmp/site:$PWD:$PWD/benchmarks PYTHONUNBUFFERED=1
{ nvidia-smi; python3 -c "import torch, triton, diffusers, faiss, numpy; print(torch.__version__, triton.__version__, diffusers.__version__, faiss.__version__, numpy.__version__, torch.cuda.get_device_name())"; nproc; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt" | tail -3
stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout --signal=INT --kill-after=20 "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name: exit $? in $((SECONDS - t0)) s"; tail -4 "$OUT/$name.log"
}
stage tiny 45 python3 benchmarks/scale.py --tiny --device cuda --max-seconds 40 --work /tmp/runs --results-dir /tmp/tiny
stage tests 90 python3 -m pytest -q -p no:cacheprovider tests/test_solver.py tests/test_hessian.py tests/test_kernels.py
stage solver 90 python3 benchmarks/solver_devices.py --results-dir "$OUT"
stage scale $((SCALE_SECONDS + 40)) python3 benchmarks/scale.py --device cuda --max-seconds "$SCALE_SECONDS" \
  --num-samples 4 --steps 8 --timesteps-kept 4 --sample-size 64 --work /tmp/runs --results-dir "$OUT"
cp /tmp/runs/sd1.5/events.json "$OUT/scale_events.json" 2>/dev/null
ls -la "$OUT"
