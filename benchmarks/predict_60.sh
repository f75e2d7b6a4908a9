#!/bin/bash
# Whole-command time of `segment predict` on the first 60 hippocampus cases (issue 16.3), with and without --tta.
#   benchmarks/predict_60.sh REPS RUN_FOLDER [RUN_FOLDER ...]       (run it on an idle machine)
# Prints one line per run: repetition, model, mode, seconds, and segment's last line.
set -euo pipefail
reps=$1; shift
root=$(cd "$(dirname "$0")/.." && pwd)
cases=$(mktemp -d); out=$(mktemp -d)
ls "$root/../shared/data/hippocampus/imagesTr" | grep -v '^\.' | sort | head -60 | while read -r f; do
  ln -s "$root/../shared/data/hippocampus/imagesTr/$f" "$cases/$f"; done
echo "== $(date -u) | $(lscpu | grep 'Model name' | sed 's/  */ /g') | $(nproc) cores"
for rep in $(seq "$reps"); do
  for model in "$@"; do
    for mode in --tta --no-tta; do
      rm -rf "$out/pred"
      start=$(date +%s.%N)
      last=$(cd "$root" && python -m segment.cli predict "$cases" -m "$model" -o "$out/pred" "$mode" 2>&1 | tail -1)
      end=$(date +%s.%N)
      echo "rep $rep | $model | $mode | $(echo "$end - $start" | bc) s | $last"
    done
  done
done
rm -rf "$cases" "$out"
