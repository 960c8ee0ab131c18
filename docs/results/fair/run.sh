#!/usr/bin/env bash
# The schedule comparison made fair by construction (README, "Fair comparisons"), at CPU size: the tiny UNet on the
# binarized digits first (where the schedules differ most), then on the 8-bit digits; 3 seeds, 150 kimg per run.
#   1. today's six arms (lognormal, cosine, laplace, cauchy, uniform_logsnr, infonoise), all with one support [0.002, 80];
#   2. Laplace and Cauchy centred on the data's crossover (schedule.snr_reference=data);
#   3. stratified σ draws (train.sigma_draw=stratified) for log-normal, Laplace and InfoNoise.
# Every run resumes where it stopped (resume=auto), and the curves skip checkpoints already evaluated, so the script
# can be killed and started again. About 2.5 minutes of training per run on one quiet CPU core.
#   bash docs/results/fair/run.sh            # both datasets
#   DATASETS=binary_digits bash docs/results/fair/run.sh
set -euo pipefail
cd "$(dirname "$0")/../../.."
PY=${PY:-.venv/bin/python}
ROOT=${ROOT:-runs/fair}
SUPPORT='schedule.sigma_range=[0.002,80]'
for data in ${DATASETS:-binary_digits digits}; do
  if [ "$data" = digits ]; then exp=schedule_sweep_digits; else exp=infonoise_binary_digits; fi
  $PY train.py -m experiment=$exp "$SUPPORT" hydra.sweep.dir=$ROOT/$data/support
  $PY train.py -m experiment=$exp "$SUPPORT" schedule=laplace,cauchy schedule.snr_reference=data \
    hydra.sweep.dir=$ROOT/$data/snr_data
  $PY train.py -m experiment=$exp "$SUPPORT" schedule=lognormal,laplace,infonoise train.sigma_draw=stratified \
    hydra.sweep.dir=$ROOT/$data/stratified
  $PY evaluate.py run_dir=$ROOT/$data eval.num_samples=1000
  if [ "$data" = binary_digits ]; then $PY evaluate.py run_dir=$ROOT/$data eval=nll; fi
  $PY evaluate.py report=$ROOT/$data out=docs/results/fair/$data eval.baseline_run=lognormal
done
