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
# STAGES picks and orders them (default: tiny tests solver scale). The kernel session's stages:
#   kernels_cpu2  kernels.py --quick on the host CPU pinned to 2 cores (the CI machines' size): another
#                 CPU vendor's figures for the LUT path (aqlm's CUDA extension compiles meanwhile on the rest)
#   lut_variants  lut_variants.py pinned to 2 cores: the CPU LUT path's parts and variants on that host
#   kernels_tests the kernel tests compiled on the GPU (fp16, bf16, fp32)
#   kernels_gpu   kernels.py --quick on CUDA: cuBLAS fp16, dequantize + GEMM, the fused kernel, aqlm's
#   e2e_gpu       e2e_step.py --models sd1.5 on CUDA: one W2 step of the SD 1.5-shaped UNet vs FP16
# Seen on an H200 (3ab3eef): kernels_cpu2 25 s, kernels_tests > 90 s (65 passed), kernels_gpu 38 s,
# e2e_gpu > 140 s (all rows printed, cut before writing its JSON): hence the limits below.
# aqlm travels as `.whl/aqlm-*.whl` (pure Python; its CUDA extension compiles there on first import).
set -u
STAGES=${STAGES:-"tiny tests solver scale"}
OUT=${OUT:-/tmp/out}
SCALE_SECONDS=${SCALE_SECONDS:-300}
mkdir -p "$OUT" /tmp/site
WHEELS=${WHEELS:-.whl}  # a folder: site.tar.xz (+ any pure-Python wheels)
tar -xJf "$WHEELS/site.tar.xz" -C /tmp/site || exit 1
for w in "$WHEELS"/*.whl; do [ -e "$w" ] && python3 -m zipfile -e "$w" /tmp/site; done
# The package as pyproject lays it out (`avq.kernels` = kernels/, `avq.finetune` = finetune/), without pip:
# links inside this copy of the tree (the current directory comes first on `python -m`'s path).
ln -sfn ../kernels avq/kernels && ln -sfn ../finetune avq/finetune
export PYTHONPATH=/tmp/site:$PWD:$PWD/benchmarks PYTHONUNBUFFERED=1
{ nvidia-smi; lscpu; python3 -c "import torch, triton, diffusers, numpy; print(torch.__version__, triton.__version__, diffusers.__version__, numpy.__version__, torch.cuda.get_device_name())"; nproc; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt" | tail -3
stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout --signal=INT --kill-after=20 "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name: exit $? in $((SECONDS - t0)) s"; tail -4 "$OUT/$name.log"
}
run_stage() {
  case $1 in
  tiny) stage tiny 45 python3 benchmarks/scale.py --tiny --device cuda --max-seconds 40 --work /tmp/runs --results-dir /tmp/tiny ;;
  tests) stage tests 90 python3 -m pytest -q -p no:cacheprovider tests/test_solver.py tests/test_hessian.py tests/test_kernels.py ;;
  solver) stage solver 90 python3 benchmarks/solver_devices.py --results-dir "$OUT" ;;
  scale)
    stage scale $((SCALE_SECONDS + 40)) python3 benchmarks/scale.py --device cuda --max-seconds "$SCALE_SECONDS" \
      --num-samples 4 --steps 8 --timesteps-kept 4 --sample-size 64 --work /tmp/runs --results-dir "$OUT"
    cp /tmp/runs/sd1.5/events.json "$OUT/scale_events.json" 2>/dev/null ;;
  kernels_cpu2)
    # aqlm's extension compiles on cores 2.. while the CPU benchmark has cores 0-1 to itself
    (taskset -c 2-$(($(nproc) - 1)) python3 -c "import aqlm.inference_kernels.cuda_kernel" > "$OUT/aqlm_build.log" 2>&1 &)
    stage kernels_cpu2 100 env OMP_NUM_THREADS=2 NUMBA_NUM_THREADS=2 taskset -c 0,1 python3 benchmarks/kernels.py --quick --device cpu
    cp benchmarks/results/kernels_cpu_quick.json "$OUT/kernels_cpu2_quick.json" 2>/dev/null ;;
  lut_variants)
    # shellcheck disable=SC2086 # LUT_ARGS: extra arguments, split on purpose
    stage lut_variants 150 env OMP_NUM_THREADS=2 NUMBA_NUM_THREADS=2 taskset -c 0,1 python3 benchmarks/lut_variants.py ${LUT_ARGS:-}
    cp benchmarks/results/lut_variants_cpu.json "$OUT/lut_variants_cpu2_$SECONDS.json" 2>/dev/null
    cp "$OUT/lut_variants.log" "$OUT/lut_variants_$SECONDS.log" ;;
  kernels_tests) stage kernels_tests 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py ;;
  kernels_gpu)
    stage kernels_gpu 130 python3 benchmarks/kernels.py --quick --device cuda
    cp benchmarks/results/kernels_cuda_quick.json "$OUT/" 2>/dev/null ;;
  e2e_gpu) stage e2e_gpu 240 python3 benchmarks/e2e_step.py --device cuda --models sd1.5 --worker-timeout 150 --results-dir "$OUT" ;;
  *) echo "unknown stage $1" ;;
  esac
}
for s in $STAGES; do run_stage "$s"; done
ls -la "$OUT"
