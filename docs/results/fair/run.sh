#!/usr/bin/env bash
# The schedule comparison made fair by construction (README, "Fair comparisons"), at CPU size: the tiny UNet on the
# binarized digits first (where the schedules differ most), then on the 8-bit digits; 3 seeds, 150 kimg per run.
#   support:    today's six arms (lognormal, cosine, laplace, cauchy, uniform_logsnr, infonoise), all with one
#               support [0.002, 80];
#   snr_data:   Laplace and Cauchy centred on the data's crossover (schedule.snr_reference=data);
#   stratified: stratified σ draws (train.sigma_draw=stratified) for log-normal, Laplace and InfoNoise.
# Every run resumes where it stopped (resume=auto), and the curves skip checkpoints already evaluated, so the script
# can be killed and started again. About 100 s of training per run on an idle 2-core machine (2 threads), and about
# 10 s per evaluated checkpoint.
#   bash docs/results/fair/run.sh                                   # everything, both datasets
#   DATASETS=digits COMPARISONS="support snr_data" bash docs/results/fair/run.sh
set -euo pipefail
cd "$(dirname "$0")/../../.."
PY=${PY:-.venv/bin/python}
ROOT=${ROOT:-runs/fair}
SUPPORT='schedule.sigma_range=[0.002,80]'
for data in ${DATASETS:-binary_digits digits}; do
  if [ "$data" = digits ]; then exp=schedule_sweep_digits; else exp=infonoise_binary_digits; fi
  for comparison in ${COMPARISONS:-support snr_data stratified}; do
    case $comparison in
      support) $PY train.py -m experiment=$exp "$SUPPORT" hydra.sweep.dir=$ROOT/$data/support ;;
      snr_data) $PY train.py -m experiment=$exp "$SUPPORT" schedule=laplace,cauchy schedule.snr_reference=data \
                  hydra.sweep.dir=$ROOT/$data/snr_data ;;
      stratified) $PY train.py -m experiment=$exp "$SUPPORT" schedule=lognormal,laplace,infonoise \
                    train.sigma_draw=stratified hydra.sweep.dir=$ROOT/$data/stratified ;;
      *) echo "unknown comparison '$comparison'; valid: support snr_data stratified" >&2; exit 2 ;;
    esac
  done
  $PY evaluate.py run_dir=$ROOT/$data eval.num_samples=1000
  if [ "$data" = binary_digits ]; then $PY evaluate.py run_dir=$ROOT/$data eval=nll; fi
  $PY evaluate.py report=$ROOT/$data out=docs/results/fair/$data eval.baseline_run=lognormal
done
# Both datasets in one report (docs/results/report.md), once both are evaluated.
if [ -d $ROOT/binary_digits ] && [ -d $ROOT/digits ]; then
  $PY evaluate.py report=$ROOT out=docs/results eval.baseline_run=lognormal
fi
