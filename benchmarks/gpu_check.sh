#!/usr/bin/env bash
# The GPU check of the training step: exp019 at its full defaults (no variant) on the full-size
# synthetic data (81 subjects), fold 0, a few epochs, bf16 autocast, in six settings:
#
#   bf16              machine=gpu machine.precision=bf16
#   compile           ... machine.compile=true
#   reduce-overhead   ... machine.compile=true machine.compile_mode=reduce-overhead (CUDA graphs)
#   bf16-cut, compile-bucketed, reduce-overhead-bucketed: the same with length-aware batches
#                     (data.pad_to_batch=true data.group_by_length=true; compiled runs round the
#                     cut lengths up to data.length_bucket: a bounded number of graphs)
#
# Each setting is one training run (benchmarks/gpu_check_run.py) in its own process; the script
# prints every epoch's wall time (training + validation, from train.log), training sequences per
# second and the peak GPU memory of each, then a markdown table for docs/benchmarks.md.
# CUDA graphs (reduce-overhead) replay fixed shapes: the last, smaller batch of an epoch is another
# shape (compiled and recorded once more unless the training loop drops it); validation runs the
# EMA model, which is not compiled.
#
#   bash benchmarks/gpu_check.sh [--epochs 3] [--exp exp019] [--subjects 81]
#   bash benchmarks/gpu_check.sh --dry-run     # the same commands on the CPU, tiny: what CI runs
#
# --dry-run: variant=smoke, machine=cpu (1 torch thread), 1 epoch, a 2-subject synthetic set in a
# temporary folder that is removed afterwards, the six settings in one process (the compile
# settings share one trace). torch.compile runs there with the "eager" backend instead of inductor
# (the same FoldRun.wrap call, its mode checked; no code generation: inductor alone takes minutes
# on a small CPU), and bf16 autocast runs on the CPU.
# Full runs write to outputs/<exp>/gpu_check-<time>-<setting>/ and the results to
# outputs/gpu_check-<time>.jsonl.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-}
if [[ -z "$PYTHON" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi

DRY_RUN=0
EPOCHS=3
EXP=exp019
SUBJECTS=81
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --epochs) EPOCHS="$2"; shift ;;
        --exp) EXP="$2"; shift ;;
        --subjects) SUBJECTS="$2"; shift ;;
        -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

STAMP=$(date +%Y%m%d-%H%M%S)
if [[ $DRY_RUN == 1 ]]; then
    WORK=$(mktemp -d)
    trap 'rm -rf "$WORK"' EXIT
    DATA="$WORK/synthetic"
    SUBJECTS=2
    OUT="$WORK/outputs"
    RESULTS="$WORK/results.jsonl"
    export OMP_NUM_THREADS=1 GPU_CHECK_COMPILE_BACKEND=${GPU_CHECK_COMPILE_BACKEND:-eager}
    COMMON=(variant=smoke machine=cpu machine.num_threads=1 trainer.epochs=1)
else
    DATA="data/synthetic_full"
    [[ $SUBJECTS == 81 ]] || DATA="data/synthetic_$SUBJECTS"
    OUT="outputs"
    mkdir -p "$OUT"
    RESULTS="$OUT/gpu_check-$STAMP.jsonl"
    COMMON=(machine=gpu "trainer.epochs=$EPOCHS")
    "$PYTHON" - <<'EOF'
import torch

if not torch.cuda.is_available():
    raise SystemExit("no CUDA GPU here: run with --dry-run to check the script on the CPU")
print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF
fi

if [[ ! -f "$DATA/train.csv" ]]; then
    echo "generating $SUBJECTS synthetic subjects in $DATA"
    "$PYTHON" -m codes.common.synthetic --out "$DATA" --subjects "$SUBJECTS" --seed 0
fi

COMMON+=(
    data=synthetic "paths.synthetic_dir=$DATA" "data.synthetic_subjects=$SUBJECTS" "paths.output_dir=$OUT"
    "data.folds=[0]" machine.precision=bf16
)
# their overrides: SETTINGS in benchmarks/gpu_check_run.py; the *-cut / *-bucketed ones are the
# same runs with length-aware batches (padded vs bucketed epoch time)
SETTINGS=(bf16 compile reduce-overhead bf16-cut compile-bucketed reduce-overhead-bucketed)
RUN=("$PYTHON" benchmarks/gpu_check_run.py --exp "$EXP" --results "$RESULTS" --run-name "gpu_check-$STAMP")
echo "common overrides: ${COMMON[*]}"
if [[ $DRY_RUN == 1 ]]; then
    # one process for the six settings: the imports alone take seconds on a small CPU
    "${RUN[@]}" --settings "$(IFS=,; echo "${SETTINGS[*]}")" -- "${COMMON[@]}"
else
    for setting in "${SETTINGS[@]}"; do  # a process each: its own compilation, CUDA graphs, memory peak
        echo "== $setting"
        "${RUN[@]}" --settings "$setting" -- "${COMMON[@]}"
    done
fi

echo
"$PYTHON" benchmarks/gpu_check_run.py --table "$RESULTS"
[[ $DRY_RUN == 1 ]] || echo "results: $RESULTS"
