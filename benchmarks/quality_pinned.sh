#!/usr/bin/env bash
# The quality table recomputed at one commit, continued across sessions (benchmarks/quality.py's docstring).
# The table takes longer than a session, and a new checkout keeps only what git holds: the rows done so far
# travel as a committed file (PROGRESS), a session's layer-wise models and sample sets do not (quality.py
# computes again what a pending row needs).
#
#   bash benchmarks/quality_pinned.sh start C [MODEL...]  # a worktree of commit C (../avq-quality-<C>), the
#                                                         # committed rows restored, one 1-thread run per
#                                                         # model (default: all three) in the background
#   bash benchmarks/quality_pinned.sh save                # the rows done so far -> PROGRESS (then commit it)
#   bash benchmarks/quality_pinned.sh pause | resume      # SIGSTOP / SIGCONT the runs (timings, CI)
#   bash benchmarks/quality_pinned.sh status              # the runs and the rows done, per model and commit
#
# When every row is done: `python benchmarks/quality.py --collect --at C` and `make_tables.py`.
set -euo pipefail

REPO=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
PARTIAL=$REPO/runs/quality/quality.partial.json
PROGRESS=$REPO/benchmarks/results/progress/quality.partial.json
PY=$REPO/.venv/bin/python
MODELS=(digits-unet digits-dit digits-t2i)

case "${1:-}" in
start)
    commit=$(git -C "$REPO" rev-parse "${2:?start needs the commit to pin}")
    shift 2
    (($#)) && MODELS=("$@")
    tree=$REPO/../avq-quality-${commit:0:7}
    if [[ ! -d $tree ]]; then
        git -C "$REPO" worktree add --detach "$tree" "$commit"
    fi
    # the worktree's code runs from PYTHONPATH: `avq.kernels` and `avq.finetune` as the wheel lays them out
    ln -sfn ../kernels "$tree/avq/kernels"
    ln -sfn ../finetune "$tree/avq/finetune"
    mkdir -p "$REPO/runs/quality"
    ln -sfn "$REPO/runs" "$tree/runs"
    if [[ ! -f $PARTIAL && -f $PROGRESS ]]; then
        cp "$PROGRESS" "$PARTIAL"
        echo "restored the committed rows from $PROGRESS"
    fi
    for model in "${MODELS[@]}"; do
        if pgrep -f "quality.py --models $model " > /dev/null; then
            echo "$model: already running"
            continue
        fi
        log=$REPO/runs/quality/pinned-${commit:0:7}-$model.log
        (
            cd "$tree"
            setsid nohup env PYTHONPATH="$tree:$tree/benchmarks" OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 \
                "$PY" benchmarks/quality.py --models "$model" --threads 1 >> "$log" 2>&1 &
        )
        echo "$model: started, log $log"
    done
    ;;
save)
    [[ -f $PARTIAL ]] || { echo "no rows yet: $PARTIAL" >&2; exit 1; }
    mkdir -p "$(dirname "$PROGRESS")"
    "$PY" - "$PARTIAL" "$PROGRESS" << 'EOF'
import json, sys
from pathlib import Path
from avq.storage.atomic import write_json_atomic
rows = json.loads(Path(sys.argv[1]).read_text())
write_json_atomic(Path(sys.argv[2]), rows, indent=1)
print(f"{len(rows['rows'])} rows -> {sys.argv[2]}")
EOF
    ;;
pause) pkill -STOP -f benchmarks/quality.py || true ;;
resume) pkill -CONT -f benchmarks/quality.py || true ;;
status)
    pgrep -af benchmarks/quality.py || echo "no run"
    [[ -f $PARTIAL ]] && "$PY" - "$PARTIAL" << 'EOF'
import collections, json, sys
rows = json.load(open(sys.argv[1]))["rows"]
done = collections.Counter((r["model"], r["commit"][:7] + ("+dirty" if r["dirty"] else "")) for r in rows)
for (model, commit), n in sorted(done.items()):
    print(f"{model:12} {commit:14} {n} rows")
EOF
    ;;
*)
    sed -n '2,14p' "$0"
    exit 2
    ;;
esac
