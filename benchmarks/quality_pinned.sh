#!/usr/bin/env bash
# The quality table recomputed at one commit, continued across sessions (benchmarks/quality.py's docstring).
# The table takes longer than a session, and a new checkout keeps only what git holds: what a later session
# needs travels as committed progress, one folder per pinned commit (benchmarks/results/progress/<C>): the
# rows done so far, the FP sample sets every row compares with (~1 MB each, ~20 min each to sample again)
# and the LAQ sensitivity tables (a few KB, minutes to measure). Layer-wise models for the fine-tuning rows
# do not travel: quality.py makes them again and checks them against the digest their row recorded
# (`layerwise_sha256`).
#
#   bash benchmarks/quality_pinned.sh start C [MODEL...]  # a worktree of commit C (../avq-quality-<C>), its
#                                                         # committed progress restored, one 1-thread run per
#                                                         # model (default: all three) in the background;
#                                                         # `A,B`: one run, B's rows after A's
#   bash benchmarks/quality_pinned.sh save                # rows and FP sample sets -> progress (commit it)
#   bash benchmarks/quality_pinned.sh pause | resume      # SIGSTOP / SIGCONT the runs (timings, CI)
#   bash benchmarks/quality_pinned.sh status              # the runs and the rows done, per model and commit
#
# When every row is done: `python benchmarks/quality.py --collect --at C` and `make_tables.py`.
set -euo pipefail

REPO=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
PARTIAL=$REPO/runs/quality/quality.partial.json
PINNED=$REPO/runs/quality/PINNED  # the commit the runs are pinned to (`start` writes it)
SAMPLES=$REPO/runs/samples
PY=${PYTHON:-$REPO/.venv/bin/python}  # the project's venv (make setup), or $PYTHON
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
    # a run that finishes writes the results file into the worktree (benchmarks/results/quality.*): put it
    # back, so that rows computed later are not stamped dirty; any other change there is refused
    git -C "$tree" checkout -- benchmarks/results
    if [[ -n $(git -C "$tree" status --porcelain --untracked-files=no) ]]; then
        echo "$tree has changes: its rows would not be of $commit" >&2
        exit 1
    fi
    # the worktree's code runs from PYTHONPATH: `avq.kernels` and `avq.finetune` as the wheel lays them out
    ln -sfn ../kernels "$tree/avq/kernels"
    ln -sfn ../finetune "$tree/avq/finetune"
    mkdir -p "$REPO/runs/quality" "$SAMPLES"
    ln -sfn "$REPO/runs" "$tree/runs"
    echo "$commit" > "$PINNED"
    progress=$REPO/benchmarks/results/progress/${commit:0:7}
    if [[ ! -f $PARTIAL && -f $progress/quality.partial.json ]]; then
        cp "$progress/quality.partial.json" "$PARTIAL"
        echo "restored the committed rows from $progress"
    fi
    if [[ -d $progress/samples ]]; then  # batches already here are kept
        cp -rn "$progress/samples/." "$SAMPLES/"
        echo "restored the FP sample sets from $progress/samples"
    fi
    for table in "$progress"/*.sensitivity.json; do  # LAQ tables (each names the commit it was measured at)
        if [[ -f $table ]]; then cp -n "$table" "$REPO/runs/quality/"; fi
    done
    for run in "${MODELS[@]}"; do  # `A,B`: one run that computes A's rows, then B's (2 cores, 3 models)
        IFS=, read -ra chain <<< "$run"
        busy=""
        for model in "${chain[@]}"; do
            if pgrep -f "quality\.py --models ([a-z0-9-]+ )*$model " > /dev/null; then busy=$model; fi
        done
        if [[ -n $busy ]]; then
            echo "$busy: already running"
            continue
        fi
        log=$REPO/runs/quality/pinned-${commit:0:7}-${run//,/+}.log
        (
            cd "$tree"
            setsid nohup env PYTHONPATH="$tree:$tree/benchmarks" OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 \
                "$PY" benchmarks/quality.py --models "${chain[@]}" --threads 1 >> "$log" 2>&1 &
        )
        echo "${chain[*]}: started, log $log"
    done
    ;;
save)
    [[ -f $PARTIAL && -f $PINNED ]] || { echo "nothing to save: no pinned run yet ($PARTIAL)" >&2; exit 1; }
    commit=$(cat "$PINNED")
    progress=$REPO/benchmarks/results/progress/${commit:0:7}
    # the progress of another pinned commit is of no use any more (git history keeps it)
    mkdir -p "$progress/samples"
    find "$REPO/benchmarks/results/progress" -mindepth 1 -maxdepth 1 ! -name "${commit:0:7}" -exec rm -rf {} +
    "$PY" - "$PARTIAL" "$progress/quality.partial.json" << 'EOF'
import json, sys
from pathlib import Path
from avq.storage.atomic import write_json_atomic
rows = json.loads(Path(sys.argv[1]).read_text())
write_json_atomic(Path(sys.argv[2]), rows, indent=1)
print(f"{len(rows['rows'])} rows -> {sys.argv[2]}")
EOF
    for set in "$SAMPLES"/*-fp-s*; do  # the FP sets only: a row's own samples are not needed again
        if [[ -d $set ]]; then cp -r "$set" "$progress/samples/"; fi
    done
    # LAQ tables (a few KB, minutes to measure) of the pinned commit only, each stamped with how it was
    # measured: the command of the LAQ row that measured it (the row's model and candidate set: `-u` the
    # uniform grids, `-low` the sub-2-bit presets), and the host (save runs where the pinned runs do). A
    # table whose row is still running has no command yet: left out until a later save
    "$PY" - "$PARTIAL" "$commit" "$progress" "$REPO"/runs/quality/*.sensitivity.json << 'EOF'
import json, sys
from pathlib import Path
from avq.storage.atomic import write_json_atomic
from avq_bench.results import device_name
rows = json.loads(Path(sys.argv[1]).read_text())["rows"]
commit, progress = sys.argv[2], Path(sys.argv[3])
for path in map(Path, sys.argv[4:]):
    if not path.is_file():  # the glob matched nothing
        continue
    table = json.loads(path.read_text())
    if table.get("commit") != commit:
        print(f"{path.name}: measured at {str(table.get('commit'))[:7]}, not the pinned commit: left out")
        continue
    model, _, kind = path.name.partition("-laq")
    measured = [
        r for r in rows
        if r["model"] == model and r.get("laq_sensitivity") == "measured" and r.get("commit") == commit
        and r["method"].startswith("avq-laq-u") == kind.startswith("-u")
        and r["preset"].startswith("w1") == ("-low" in kind)
    ]
    if not measured:
        print(f"{path.name}: the row that measures it is not done yet: left out")
        continue
    table.update(command=measured[0]["command"], dirty=measured[0]["dirty"])
    write_json_atomic(progress / path.name, {**table, "device": table.get("device", device_name())}, indent=1)
EOF
    du -sh "$progress"
    ;;
pause) pkill -STOP -f benchmarks/quality.py || true ;;
resume) pkill -CONT -f benchmarks/quality.py || true ;;
status)
    pgrep -af benchmarks/quality.py || echo "no run"
    if [[ -f $PARTIAL ]]; then
        "$PY" - "$PARTIAL" << 'EOF'
import collections, json, sys
rows = json.load(open(sys.argv[1]))["rows"]
stamp = lambda r: r.get("commit", "no commit")[:7] + ("+dirty" if r.get("dirty", True) else "")
for (model, commit), n in sorted(collections.Counter((r["model"], stamp(r)) for r in rows).items()):
    print(f"{model:12} {commit:14} {n} rows")
EOF
    fi
    commit=$(cat "$PINNED" 2> /dev/null || true)
    tree=$REPO/../avq-quality-${commit:0:7}
    if [[ -f $PARTIAL && -n $commit && -f $tree/benchmarks/quality.py ]]; then
        # of the rows the pinned commit's quality.py computes by default: how many are done, and the next
        (cd "$tree" && PYTHONPATH="$tree:$tree/benchmarks" "$PY" - "$PARTIAL" "$commit" << 'EOF'
import json, sys
import quality as q
rows = json.load(open(sys.argv[1]))["rows"]
for model in q.MODELS:
    todo = ["fp", *q.model_configs(model, [*q.CONFIGS, *q.T2I_CONFIGS, *q.PV_CONFIGS])]
    done = {r["config"] for r in rows if r["model"] == model and r.get("commit") == sys.argv[2] and not r.get("dirty", True)}
    left = [c for c in todo if c not in done]
    print(f"{model:12} {len(todo) - len(left)}/{len(todo)} done" + (f", next {left[0]}" if left else ""))
EOF
        )
        for log in "$REPO"/runs/quality/pinned-"${commit:0:7}"-*.log; do  # where each run is now
            if [[ -f $log ]]; then
                echo "${log##*/}: $(tail -c 300 "$log" | tr '\r' '\n' | grep -v '^\s*$' | tail -n 1)"
            fi
        done
    fi
    ;;
*)
    sed -n '2,14p' "$0"
    exit 2
    ;;
esac
