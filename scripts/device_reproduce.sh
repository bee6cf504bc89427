#!/usr/bin/env bash
# Train and analyse the whole reproduction (issue 9) on one machine in one call, publishing as it goes.
#
#   scripts/device_reproduce.sh OUTDIR [--quick] [more `pdelightning-reproduce all` arguments]
#
# OUTDIR receives, incrementally (a call killed at any moment keeps every finished unit's results):
#   summary.csv.gz, runs.csv      merged long-format summary and run table (what `pdelightning-reproduce report` reads)
#   units/<run or pair>/          each analysed unit's summary.csv and run.json / pair.json
#   progress.log                  one line per start / finish, with seconds since the start
#   env.txt                       machine, GPU, versions, the command
#   report/REPRODUCTION.md        the report rendered from OUTDIR at the end (if time is left)
# Checkpoints and TensorBoard logs stay in $RUNS (default runs/device), never in OUTDIR.
#
# Environment (defaults for one GPU with 16 CPU cores):
#   PY=python3  DATA=.devdata (MNIST/raw/*.gz and 20newsgroups/20news-bydate.tar.gz)  RUNS=runs/device
#   WORKERS=12  THREADS=1 (torch threads per worker)  LIMIT_S=540 (wall budget of the whole call)
#   TRAIN_STOP_S=LIMIT_S-200 (no training run starts later)  WHEELS=.devwheels (pip install --no-index from here
#   when jsonargparse is missing)  REPORT=1 (render the report at the end)
# Priorities: the main settings (MNIST Transformer and PDE, 20 Newsgroups Transformer and PDE) seed by seed first,
# then the sweeps seed-major; analyses run as soon as their runs finish and go ahead of queued training.
# Quick check on a CPU:  PY=.venv/bin/python DATA=../shared/data WORKERS=2 scripts/device_reproduce.sh /tmp/q --quick
set -uo pipefail

OUTDIR=${1:?usage: scripts/device_reproduce.sh OUTDIR [--quick] [pdelightning-reproduce all arguments]}
shift
PY=${PY:-python3}
DATA=${DATA:-.devdata}
RUNS=${RUNS:-runs/device}
WORKERS=${WORKERS:-12}
THREADS=${THREADS:-1}
LIMIT_S=${LIMIT_S:-540}
TRAIN_STOP_S=${TRAIN_STOP_S:-$((LIMIT_S - 200))}
WHEELS=${WHEELS:-.devwheels}
REPORT=${REPORT:-1}
START=$(date +%s)

mkdir -p "$OUTDIR" "$RUNS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
export PYTHONWARNINGS=ignore TOKENIZERS_PARALLELISM=false

if ! "$PY" -c "import jsonargparse" 2>/dev/null; then
  if [ -d "$WHEELS" ]; then
    "$PY" -m pip install -q --no-index --find-links "$WHEELS" "jsonargparse[signatures]" typeshed-client docstring-parser 2>&1 | tail -3
  fi
fi
if ! "$PY" -c "import torchvision" 2>/dev/null; then
  if [ -d "$WHEELS" ] && ls "$WHEELS"/torchvision-*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps "$WHEELS"/torchvision-*.whl 2>&1 | tail -3
  fi
fi
"$PY" -c "import jsonargparse, lightning, torch, sklearn, pandas, matplotlib, yaml" || { echo "missing packages" >&2; exit 3; }
# pdelightning/data/mnist.py reads the IDX files with torchvision: carry a wheel matching the installed torch if absent
"$PY" -c "import torchvision" || { echo "torchvision missing: MNIST cannot be read (pdelightning/data/mnist.py)" >&2; exit 3; }

{
  echo "start: $(date -u +%FT%TZ)  host: $(hostname)  cpus: $(nproc --all)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import sys, torch, lightning; print('python', sys.version.split()[0], 'torch', torch.__version__, 'lightning', lightning.__version__, 'cuda', torch.cuda.is_available())"
  echo "git: $(git rev-parse HEAD 2>/dev/null || echo none) $(git status --porcelain 2>/dev/null | wc -l) changed files"
  echo "command: WORKERS=$WORKERS THREADS=$THREADS LIMIT_S=$LIMIT_S TRAIN_STOP_S=$TRAIN_STOP_S DATA=$DATA RUNS=$RUNS $0 $OUTDIR $*"
} > "$OUTDIR/env.txt" 2>&1

# The pipeline ends itself before the call's limit, leaving time for the final merge and the report.
ELAPSED=$(($(date +%s) - START))
PIPE_S=$((LIMIT_S - 45 - ELAPSED))
timeout --signal=TERM --kill-after=15 "$PIPE_S" "$PY" -m pdelightning_reproduce all \
  --out "$RUNS" --publish "$OUTDIR" --mnist-dir "$DATA" --newsgroups-dir "$DATA/20newsgroups" \
  --workers "$WORKERS" --threads-per-worker "$THREADS" --stop-training-after "$((TRAIN_STOP_S - ELAPSED))" "$@"
rc=$?
echo "pipeline exit $rc after $(( $(date +%s) - START )) s" | tee -a "$OUTDIR/progress.log"

# A killed pipeline may have missed the last merge: merge what was published.
"$PY" -c "from pathlib import Path; from pdelightning_reproduce.summary import merge; o = Path('$OUTDIR'); \
print('merged rows, runs:', merge(o / 'units', o)) if (o / 'units').is_dir() else None" | tee -a "$OUTDIR/progress.log"

LEFT=$((LIMIT_S - ($(date +%s) - START)))
if [ "$REPORT" = 1 ] && [ "$LEFT" -gt 25 ] && [ -f "$OUTDIR/summary.csv.gz" ]; then
  timeout $((LEFT - 5)) "$PY" -m pdelightning_reproduce report "$OUTDIR" --out "$OUTDIR/report" 2>&1 | tail -2 | tee -a "$OUTDIR/progress.log"
fi
echo "done after $(( $(date +%s) - START )) s" | tee -a "$OUTDIR/progress.log"
exit $rc
