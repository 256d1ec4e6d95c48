#!/usr/bin/env bash
# FSDP check of the trainer on a GPU machine, in one command (issue 13; details in bench/gpu_fsdp.py):
#
#   PYTHONPATH=/tmp/site:$PWD bash bench/gpu_fsdp.sh          # GPU: every visible GPU one FSDP process
#   PYTHONPATH=$PWD bash bench/gpu_fsdp.sh --cpu              # rehearsal on CPU: 2 processes, gloo
#
# Builds a tiny pivot and fused targets, then trains with trainer/configs/fsdp.yaml (FSDP2):
#   fp32 8 steps straight | fp32 4 steps + resume (optimizer state from torch.distributed.checkpoint) |
#   that checkpoint resumed by one plain process | bf16 straight | bf16 4 + resume
# and prints a table comparing each resumed run with its straight twin; the last line is
# "GPU FSDP CHECK: PASS" (exit 0) or "... FAIL" (exit 1). Logs: $OUT/gpu_fsdp/ when OUT is set, else a
# temporary directory (printed). Every launch has a time limit, so nothing hangs past ~4 minutes.
set -uo pipefail

CPU=0
[[ "${1:-}" == "--cpu" ]] && CPU=1
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$ROOT" TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export CUBLAS_WORKSPACE_CONFIG=:4096:8 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [[ -n "${OUT:-}" ]]; then LOGS="$OUT/gpu_fsdp"; else LOGS="$(mktemp -d)/gpu_fsdp"; fi
WORK="$(mktemp -d)"
mkdir -p "$LOGS"
PY="${PYTHON:-python3}"
LIMIT=150  # seconds per step on a GPU (a step takes ~10-20 s there); CPU rehearsal: 900

fail() {  # name of the failed step, its log
  echo "FAILED: $1 (log $2); its last lines:"
  tail -n 40 "$2"
  echo "GPU FSDP CHECK: FAIL"
  exit 1
}

step() {  # name, command... ("launch RUN ARGS...": the FSDP launch of bench/gpu_fsdp.py train)
  local name="$1"; shift
  local log="$LOGS/$name.log"
  if [[ "$1" == launch ]]; then
    shift
    local port
    port="$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    set -- "$PY" -m accelerate.commands.launch --config_file trainer/configs/fsdp.yaml --num_processes "$NPROC" \
      --main_process_port "$port" "${SHIM[@]}" train "$WORK" "$@" "${EXTRA[@]}"
  fi
  local t0=$SECONDS
  timeout -k 10 "$LIMIT" "$@" >"$log" 2>&1 || fail "$name (exit $?)" "$log"
  echo "  $name: $((SECONDS - t0)) s"
}

"$PY" - <<'EOF' 2>&1 | tee "$LOGS/env.log"
import importlib, torch
print(f"torch {torch.__version__}, cuda {torch.cuda.is_available()}"
      + (f" ({torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} GPU)" if torch.cuda.is_available() else ""))
for name in ("accelerate", "transformers", "pydantic", "pyarrow", "safetensors", "tokenizers", "deltalake"):
    try:
        print(f"{name} {importlib.import_module(name).__version__}")
    except ImportError as e:
        print(f"{name} missing ({e})")
EOF

if [[ $CPU == 1 ]]; then
  NPROC=2; EXTRA=(--cpu); SHIM=(-m bench._cpu_fsdp bench.gpu_fsdp); LIMIT=900
else
  NPROC="$("$PY" -c 'import torch; print(torch.cuda.device_count())')"
  if [[ "$NPROC" -lt 1 ]]; then echo "no GPU visible (use --cpu to rehearse on CPU)"; echo "GPU FSDP CHECK: FAIL"; exit 1; fi
  EXTRA=(); SHIM=(-m bench.gpu_fsdp)
fi
echo "logs: $LOGS; work: $WORK; $NPROC FSDP process(es)"

T0=$SECONDS
step prepare "$PY" -m bench.gpu_fsdp prepare "$WORK"
tr '\r' '\n' <"$LOGS/prepare.log" | grep -h "^prepared:"
step fp32 launch fp32
step fp32-stop launch fp32-resumed --stop-after 4
cp -r "$WORK/runs/fp32-resumed" "$WORK/runs/fp32-one-process"
step fp32-resume launch fp32-resumed
step fp32-one-process "$PY" -m bench.gpu_fsdp train "$WORK" fp32-one-process "${EXTRA[@]}"
step bf16 launch bf16
step bf16-stop launch bf16-resumed --stop-after 4
step bf16-resume launch bf16-resumed
grep -h "^run \|tok/s" "$LOGS"/fp32.log | tail -n 3
echo "total $((SECONDS - T0)) s"
"$PY" -m bench.gpu_fsdp compare "$WORK" 2>&1 | tee "$LOGS/compare.log"
exit "${PIPESTATUS[0]}"
