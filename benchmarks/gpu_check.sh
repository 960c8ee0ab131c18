#!/usr/bin/env bash
# One command on a machine with one CUDA GPU; writes docs/results/gpu-<date>.md (or --out DIR):
#   1. environment (GPU, driver, torch, CUDA, cuDNN, NCCL)
#   2. the GPU-marked tests (tests/test_gpu.py: bf16/fp16 step, channels_last, compiled step, no host sync in the
#      steady state, nonfinite=skip on the device, CUDA RNG resume)
#   3. benchmarks/train_step.py for ddpmpp (32x32x3, 10 classes) and dit_xl2 (32x32x4 latents, 1000 classes) in fp32,
#      bf16 and bf16+compile on synthetic data: img/s, memory, MFU (peak from --peak-tflops or the script's table)
#   4. torchrun, 1 process: an NCCL process group (all-reduce, DDP step), then train.py trains, checkpoints, resumes
#      and sample.py samples
#   5. sampler throughput at 35 NFE (EDM Heun, 18 steps)
# Meant to finish in under 8 minutes on one H100/H200-class GPU (the compiles take most of it).
#
#   bash benchmarks/gpu_check.sh [--peak-tflops 989] [--out DIR]
#   bash benchmarks/gpu_check.sh --cpu --quick --out /tmp/check     # every section at tiny sizes on the CPU (CI)
#
# Every section runs even if one before it failed; a failed section is marked FAILED in the report and the script
# exits with status 1. PYTHON=... picks the interpreter (default .venv/bin/python if present, else python3).
set -uo pipefail
cd "$(dirname "$0")/.."

CPU=0
QUICK=0
OUT=docs/results
PEAK=""
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) CPU=1 ;;
        --quick) QUICK=1 ;;
        --out) OUT="$2"; shift ;;
        --peak-tflops) PEAK="$2"; shift ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown option '$1' (valid: --cpu --quick --out DIR --peak-tflops X)" >&2; exit 2 ;;
    esac
    shift
done
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export WANDB_MODE=disabled HYDRA_FULL_ERROR=1 PYTHONUNBUFFERED=1
if [ "$CPU" = 1 ]; then
    DEVICE=cpu
    BACKEND=gloo
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
    DEVICE=cuda
    BACKEND=nccl
    if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_check.sh: torch sees no CUDA device (run with --cpu --quick to check the script on a CPU)" >&2
        exit 2
    fi
fi
mkdir -p "$OUT"
REPORT="$OUT/gpu-$(date +%F).md"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
FAILED=0
START=$(date +%s)

# run_section TITLE TIMEOUT_S COMMAND...: run COMMAND, then put its table lines ('|' or 'MFU') into the report as
# markdown and the rest of its output (last 60 lines) into a folded log.
run_section() {
    local title="$1" limit="$2"
    shift 2
    local log="$WORK/section.log" t0 status
    t0=$(date +%s)
    echo "== $title" >&2
    timeout "$limit" "$@" >"$log" 2>&1
    status=$?
    {
        echo
        echo "Command: \`$*\` ($(( $(date +%s) - t0 )) s, exit status $status)"
        echo
        grep -E '^(\||MFU against)' "$log" || true
        echo
        echo "<details><summary>output (last 60 lines)</summary>"
        echo
        echo '```'
        grep -vE '^(\||ROW |\{)' "$log" | tail -n 60
        echo '```'
        echo "</details>"
    } >>"$REPORT"
    if [ "$status" != 0 ]; then
        FAILED=1
        echo "**FAILED** (exit status $status$([ "$status" = 124 ] && echo ": over the ${limit} s limit"))" >>"$REPORT"
        echo "   FAILED ($status)" >&2
    fi
    return 0
}

# ---------------------------------------------------------------------------------------------------------------------
{
    echo "# GPU check, $(date '+%Y-%m-%d %H:%M')"
    echo
    echo "\`bash benchmarks/gpu_check.sh$([ "$CPU" = 1 ] && echo ' --cpu')$([ "$QUICK" = 1 ] && echo ' --quick')\`" \
         "at commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (with local changes)')."
    [ "$CPU" = 1 ] && echo "**CPU mode** (--cpu): tiny sizes, gloo; checks that the script works, measures nothing of a GPU."
    echo
    echo "## 1. Environment"
    echo
} >"$REPORT"
"$PY" - >>"$REPORT" 2>&1 <<'EOF' || FAILED=1
import os, platform, subprocess, sys
import torch
rows = [("python", platform.python_version()), ("torch", torch.__version__),
        ("CUDA (torch built with)", torch.version.cuda or "none"),
        ("cuDNN", torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else "none"),
        ("CPUs", len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())]
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    rows += [("GPU", f"{p.name} ({p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}, "
                     f"{p.multi_processor_count} SMs)"), ("GPUs visible", torch.cuda.device_count()),
             ("NCCL", ".".join(map(str, v)) if isinstance(v := torch.cuda.nccl.version(), tuple) else str(v))]
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
        rows.append(("driver", smi[0] if smi else "?"))
    except (OSError, subprocess.SubprocessError):
        rows.append(("driver", "nvidia-smi not found"))
else:
    rows.append(("GPU", "none (CPU mode)"))
print("| | |\n|---|---|")
for k, v in rows:
    print(f"| {k} | {v} |")
EOF

# ---------------------------------------------------------------------------------------------------------------------
echo -e "\n## 2. GPU tests\n" >>"$REPORT"
echo "\`pytest -m gpu tests/test_gpu.py\`: without CUDA every one of them is skipped." >>"$REPORT"
run_section "GPU tests" 300 "$PY" -m pytest -q -m gpu -p no:cacheprovider -rA tests/test_gpu.py

# ---------------------------------------------------------------------------------------------------------------------
echo -e "\n## 3. Training step\n" >>"$REPORT"
if [ "$QUICK" = 1 ]; then
    STEP_ARGS=(--rows fp32,bf16,bf16+compile --steps 2 --repeats 1 --batch 4 --data synthetic --device "$DEVICE")
    [ "$CPU" = 1 ] && STEP_ARGS+=(--compile-backend aot_eager)
    DDPMPP=(--set model.model_channels=16 --set model.num_blocks=1 --set model.dropout=0)
    DIT=(--set model.depth=2 --set model.hidden_size=64 --set model.num_heads=2)
    SAMPLER=(--num 8 --batch 8 --set sampler.num_steps=18)
    SAMPLER_MODEL=(--set model.model_channels=8 --set model.num_blocks=1)
    echo "Quick mode: reduced networks (ddpmpp width 16, 1 block; DiT depth 2, width 64), batch 4, one block of" \
         "2 steps$([ "$CPU" = 1 ] && echo '; compiled rows with the aot_eager backend (tracing, no code generation)')." \
         >>"$REPORT"
else
    STEP_ARGS=(--rows fp32,bf16,bf16+compile --steps 5 --repeats 3 --data synthetic --device cuda --threads 4)
    DDPMPP=(--batch 128)
    DIT=(--batch 64)
    SAMPLER=(--num 2048 --batch 512)
    SAMPLER_MODEL=()
    echo "Full-size networks on synthetic data (random pixels / latents written to a temporary prepared dataset," \
         "read through the training loader); the Trainer's real step; median of 3 blocks of 5 steps after 3" \
         "warm-up steps. MFU = 3 x forward FLOPs x img/s / dense bf16 peak. Published anchors: fast-DiT trains" \
         "DiT-XL/2 at batch 128 on one A100 at 0.84 steps/s (~108 img/s, AMP, cached latents)." >>"$REPORT"
fi
[ -n "$PEAK" ] && STEP_ARGS+=(--peak-tflops "$PEAK")
run_section "train step: ddpmpp" 330 "$PY" benchmarks/train_step.py --models ddpmpp "${STEP_ARGS[@]}" "${DDPMPP[@]}"
run_section "train step: dit_xl2" 330 "$PY" benchmarks/train_step.py --models dit_xl2 "${STEP_ARGS[@]}" "${DIT[@]}"

# ---------------------------------------------------------------------------------------------------------------------
echo -e "\n## 4. torchrun: $BACKEND process group, then train, checkpoint, resume, sample\n" >>"$REPORT"
cat >"$WORK/dist_smoke.py" <<'EOF'
import os, torch, torch.distributed as dist
backend = os.environ["SMOKE_BACKEND"]
device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if backend == "nccl" else torch.device("cpu")
if device.type == "cuda":
    torch.cuda.set_device(device)
dist.init_process_group(backend)
x = torch.ones(4, device=device) * (dist.get_rank() + 1)
dist.all_reduce(x)
net = torch.nn.parallel.DistributedDataParallel(torch.nn.Conv2d(3, 8, 3).to(device),
                                                device_ids=[device.index] if device.type == "cuda" else None)
net(torch.randn(2, 3, 8, 8, device=device)).square().mean().backward()
out = [None]
dist.all_gather_object(out, {"rank": dist.get_rank()})
dist.barrier()
print(f"{backend} process group of {dist.get_world_size()}: all_reduce {x.tolist()}, DDP backward ok, "
      f"all_gather_object {out}")
dist.destroy_process_group()
EOF
RUN="$WORK/run"
TRAIN=(model=unet_tiny train.batch=64 train.tick_kimg=0.32 train.checkpoint_kimg=0.32 train.snapshot_kimg=0
       train.grid_seeds=0 train.lr_rampup_kimg=0 device="$DEVICE")
[ "$QUICK" = 1 ] && TRAIN+=(model.model_channels=8 model.num_blocks=1)
cat >"$WORK/torchrun.sh" <<EOF
set -eo pipefail
SMOKE_BACKEND=$BACKEND "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 "$WORK/dist_smoke.py"
"$PY" -m torch.distributed.run --standalone --nproc_per_node=1 train.py run_dir="$RUN" ${TRAIN[*]} train.total_kimg=0.64
"$PY" -m torch.distributed.run --standalone --nproc_per_node=1 train.py run_dir="$RUN" ${TRAIN[*]} \
    train.total_kimg=1.28 2>&1 | tee "$WORK/resume.log"
"$PY" sample.py ckpt="$RUN" seeds=0-15 out="$RUN/samples" device="$DEVICE" write_pngs=false
echo "train -> checkpoints: \$(ls "$RUN/checkpoints" | tr '\n' ' ')"
echo "resume: \$(grep -o 'resumed from .*' "$WORK/resume.log" | head -n 1)"
echo "sample: \$(ls "$RUN/samples" | tr '\n' ' ')"
EOF
run_section "torchrun" 240 bash "$WORK/torchrun.sh"

# ---------------------------------------------------------------------------------------------------------------------
echo -e "\n## 5. Sampler throughput\n" >>"$REPORT"
echo "EDM's Heun sampler, 18 steps = 35 NFE, random weights (speed does not depend on them): img/s at 35 NFE." \
     >>"$REPORT"
run_section "sampler: ddpmpp" 180 "$PY" benchmarks/sampler_speed.py --model ddpmpp --device "$DEVICE" \
    "${SAMPLER[@]}" "${SAMPLER_MODEL[@]}"
if [ "$QUICK" != 1 ]; then
    run_section "sampler: dit_xl2" 180 "$PY" benchmarks/sampler_speed.py --model dit_xl2 --precision bf16 \
        --device cuda --num 512 --batch 128
fi

echo -e "\nTotal: $(( $(date +%s) - START )) s.$([ "$FAILED" = 1 ] && echo ' Some sections FAILED (see above).')" \
    >>"$REPORT"
echo "report: $REPORT" >&2
exit "$FAILED"
