#!/usr/bin/env bash
# The CPU part of the reproduction (issue 9), run in the background by ONE worker process with ONE torch thread.
#
#   scripts/cpu_reproduce.sh import      # GPU-trained MNIST weights -> $OUT (step-0 weights regenerated)
#   scripts/cpu_reproduce.sh train       # every run of the CPU budget not yet trained (resumable)
#   scripts/cpu_reproduce.sh train --settings sweep_pde   # extra arguments go to `pdelightning-reproduce`
#   scripts/cpu_reproduce.sh analyze     # every run and pair not yet analysed (resumable), then merge
#   scripts/cpu_reproduce.sh publish     # merged summary, compute.json, the GPU call's logs -> docs/reproduction/;
#                                        # stale figures removed, report -> docs/REPRODUCTION.md, docs/figures/
#
# Each command first copies the code it runs into a snapshot ($SNAP: the committed tree of HEAD with the
# reproduction's own folders taken from the working tree), so edits made meanwhile by others never reach a
# running job. Logs go to $OUT/logs/<command>.log; start it with
#   setsid nohup scripts/cpu_reproduce.sh train > /dev/null 2>&1 &
# Environment: PY (default .venv/bin/python), OUT (runs/repro/out), PUB (runs/repro/published),
# DATA (../shared/data), GPU_WEIGHTS (runs/repro/gpu_weights), GPU_UNITS (/tmp/dev6/units).
set -uo pipefail
CMD=${1:?usage: scripts/cpu_reproduce.sh import|train|analyze|publish [extra reproduce arguments]}
shift
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
OUT=${OUT:-$ROOT/runs/repro/out}
PUB=${PUB:-$ROOT/runs/repro/published}
DATA=${DATA:-$(cd "$ROOT/../shared/data" && pwd)}
GPU_WEIGHTS=${GPU_WEIGHTS:-$ROOT/runs/repro/gpu_weights}
GPU_UNITS=${GPU_UNITS:-/tmp/dev6/units}
SNAP=${SNAP:-$ROOT/runs/repro/snapshot-$CMD}
mkdir -p "$OUT/logs" "$PUB"
LOG="$OUT/logs/$CMD.log"

snapshot() {
  rm -rf "$SNAP" && mkdir -p "$SNAP"
  git -C "$ROOT" archive HEAD | tar -x -C "$SNAP"
  for p in pdelightning_reproduce scripts; do
    rm -rf "${SNAP:?}/$p" && cp -r "$ROOT/$p" "$SNAP/$p"
  done
  for f in "$ROOT"/pdelightning/analysis/*.py; do  # new files only: the committed analysis package is kept
    [ -e "$SNAP/pdelightning/analysis/$(basename "$f")" ] || cp "$f" "$SNAP/pdelightning/analysis/"
  done
  echo "snapshot: HEAD $(git -C "$ROOT" rev-parse --short HEAD) + working-tree pdelightning_reproduce (configs included)," \
       "scripts, new pdelightning/analysis files -> $SNAP"
}

export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
{
  echo "== $(date -u +%FT%TZ) $CMD (pid $$)"
  snapshot
  cd "$SNAP" || exit 2
  export PYTHONPATH="$SNAP"
  case "$CMD" in
    import)
      "$PY" -m pdelightning_reproduce.imported --weights "$GPU_WEIGHTS" --units "$GPU_UNITS" --out "$OUT" \
        --mnist-dir "$DATA" ;;
    train)
      "$PY" -m pdelightning_reproduce train --budget cpu --out "$OUT" --publish "$PUB" --mnist-dir "$DATA" \
        --newsgroups-dir "$DATA/20newsgroups" --workers 1 --threads-per-worker 1 "$@" ;;
    analyze)
      "$PY" -m pdelightning_reproduce analyze --budget cpu --out "$OUT" --publish "$PUB" --mnist-dir "$DATA" \
        --newsgroups-dir "$DATA/20newsgroups" --workers 1 --threads-per-worker 1 "$@" ;;
    publish)
      cd "$ROOT" || exit 2
      "$PY" -c "from pathlib import Path; from pdelightning_reproduce.summary import merge; \
print('merged rows, runs:', merge(Path('$PUB') / 'units', Path('docs/reproduction')))"
      "$PY" -m pdelightning_reproduce.compute --sampler "$OUT/logs/cpu_sampler.log" --gpu-units "$GPU_UNITS" \
        --job-logs "$OUT/logs/train.log" "$OUT/logs/analyze.log" \
        --cpu-units "$PUB/units" --out docs/reproduction
      mkdir -p docs/reproduction/gpu_call
      for f in env.txt progress.log; do [ -f "$GPU_UNITS/../$f" ] && cp "$GPU_UNITS/../$f" docs/reproduction/gpu_call/; done
      rm -f docs/figures/*.png
      "$PY" -m pdelightning_reproduce report docs/reproduction --out docs ;;
    *) echo "unknown command $CMD; valid: import, train, analyze, publish" >&2; exit 2 ;;
  esac
  echo "== $(date -u +%FT%TZ) $CMD exit $?"
} >> "$LOG" 2>&1
