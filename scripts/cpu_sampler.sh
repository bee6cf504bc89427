#!/usr/bin/env bash
# Append, every minute, the CPU time of every process of the reproduction's background jobs (the pipeline and its
# worker) to $OUT/logs/cpu_sampler.log, so the report can state the CPU time they used (not just wall time).
OUT=${OUT:-$(cd "$(dirname "$0")/.." && pwd)/runs/repro/out}
while true; do
  ps -eo pid,etime,cputime,args | grep -E "reproduce (train|analyze)|spawn_main" | grep -v grep \
    | awk -v t="$(date -u +%FT%TZ)" '{print t, $1, $2, $3}' >> "$OUT/logs/cpu_sampler.log"
  sleep 60
done
