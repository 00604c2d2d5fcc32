#!/usr/bin/env bash
# The GPU check in one call (issue 17 §6), on a machine with CUDA:
#   1. the environment: nvidia-smi, torch / triton / vllm versions                    -> $OUT/env.txt
#   2. the GPU stack: nothing if .venv's torch sees CUDA and imports vllm, else scripts/setup.sh, which
#      installs the `gpu` extra (the CUDA `vllm` wheel and the torch it pins) when nvidia-smi sees a GPU
#   3. the `gpu`-marked tests (Triton kernels natively, CUDA vs CPU, the CUDA learner) -> $OUT/pytest_gpu.*
#   4. the kernel benchmarks on CUDA: bench_kernels and bench_mxfp4 with --device cuda -> their own
#      bench/RESULTS.md sections ("Kernels on CUDA ...", "MXFP4 quantise/dequantise on CUDA")
#   5. a few GRPO steps of the tiny pipeline on CUDA: the learner (learner.device=cuda, bf16 autocast) and
#      one vLLM engine share GPU 0 through a colocated Ray placement group           -> $OUT/tiny_cuda/
#   6. with 2 GPUs or more: the same GRPO steps with the FSDP2 learner group over every visible GPU
#      (learner.world_size = GPUs; rank i and engine i share GPU i, NCCL between ranks) -> $OUT/tiny_fsdp/
#   7. the summary: bench/RESULTS.md section "GPU check (scripts/gpu_check.sh)" and $OUT/summary.md
# Every stage runs even if an earlier one failed; each one's exit status and time go to $OUT/status.tsv,
# and the script exits non-zero if any failed.
#
#   bash scripts/gpu_check.sh [--steps 3] [--sft-steps 100] [--out DIR] [--no-install] [--quick]
#
# --quick: bench_kernels --quick and a shorter MXFP4 bench (a smoke run, e.g. under a device time limit).
# Not run yet: no GPU was lent to the session that wrote it (README "Running on GPUs").
set -uo pipefail
cd "$(dirname "$0")/.."

ARGS="$*"
STEPS=3
SFT_STEPS=100
OUT="outputs/gpu_check-$(date +%Y-%m-%d_%H-%M-%S)"
INSTALL=1
QUICK=0
while [ $# -gt 0 ]; do
  case "$1" in
    --steps) STEPS=$2; shift 2 ;;
    --sft-steps) SFT_STEPS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --no-install) INSTALL=0; shift ;;
    --quick) QUICK=1; shift ;;
    *) echo "gpu_check: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
PY=.venv/bin/python
mkdir -p "$OUT"
: > "$OUT/status.tsv"
FAILED=0

# stage NAME CMD...: run CMD with its output in $OUT/NAME.log, record exit status and seconds.
stage() {
  local name=$1; shift
  local t0=$SECONDS
  echo "== gpu_check: $name: $*"
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$OUT/status.tsv"
  echo "== gpu_check: $name: exit $rc after $((SECONDS - t0)) s (log: $OUT/$name.log)"
  [ "$rc" -eq 0 ] || FAILED=1
  return "$rc"
}

if ! nvidia-smi -L > /dev/null 2>&1; then
  echo "gpu_check: nvidia-smi sees no GPU; this check needs a CUDA machine" >&2
  exit 2
fi

stack_ok() {
  [ -x "$PY" ] && "$PY" -c "import sys, torch, vllm; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null
}
if [ "$INSTALL" -eq 1 ] && ! stack_ok; then
  stage install bash scripts/setup.sh
  if ! stack_ok; then
    echo "gpu_check: .venv's torch still sees no CUDA (a .venv built on a CPU machine keeps torch 2.13.0+cpu," \
         "which satisfies the pin): remove .venv and rerun" >&2
    exit 2
  fi
fi

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" - <<'EOF'
import importlib.metadata as md
import torch
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), device {torch.cuda.get_device_name(0)}, "
      f"capability {'.'.join(map(str, torch.cuda.get_device_capability(0)))}")
print(", ".join(f"{p} {md.version(p)}" for p in ("triton", "vllm", "transformers", "ray")))
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

stage pytest_gpu "$PY" -m pytest -m gpu -q -p no:cacheprovider --junitxml="$OUT/pytest_gpu.xml" tests
if [ "$QUICK" -eq 1 ]; then
  stage bench_kernels "$PY" -m bench.bench_kernels --device cuda --quick --write bench/RESULTS.md
  stage bench_mxfp4 "$PY" -m bench.bench_mxfp4 --device cuda --experts 8 --min-time 0.3 --write bench/RESULTS.md
else
  stage bench_kernels "$PY" -m bench.bench_kernels --device cuda --write bench/RESULTS.md
  stage bench_mxfp4 "$PY" -m bench.bench_mxfp4 --device cuda --experts 32 --write bench/RESULTS.md
fi
# The tiny pipeline (build, a short SFT, GRPO, a small eval) with the learner on CUDA next to one bf16
# vLLM engine on the same GPU; the eval is there to exercise the path, not to measure accuracy.
stage tiny_grpo_cuda "$PY" -m rl.pipeline experiment=tiny run_dir="$OUT/tiny_cuda" \
  train.steps="$STEPS" sft.steps="$SFT_STEPS" eval.tasks=30 eval.samples_per_task=1 \
  learner.device=cuda learner.num_gpus=0.5 rollout.num_gpus=0.5 cluster.placement=colocate \
  rollout.dtype=bfloat16 rollout.gpu_memory_utilization=0.3 logging.progress=false
NGPU=$(nvidia-smi -L | wc -l)
if [ "$NGPU" -ge 2 ]; then  # NCCL needs one GPU per rank
  stage tiny_grpo_fsdp "$PY" -m rl.pipeline experiment=tiny run_dir="$OUT/tiny_fsdp" \
    train.steps="$STEPS" sft.steps="$SFT_STEPS" eval.tasks=30 eval.samples_per_task=1 \
    learner.device=cuda learner.world_size="$NGPU" learner.num_gpus=0.5 rollout.num_workers="$NGPU" \
    rollout.num_gpus=0.5 cluster.placement=colocate rollout.dtype=bfloat16 rollout.gpu_memory_utilization=0.3 \
    logging.progress=false
fi
stage summary "$PY" -m bench.gpu_check --out "$OUT" --command "bash scripts/gpu_check.sh $ARGS" --write bench/RESULTS.md
cat "$OUT/summary.md" 2>/dev/null
exit "$FAILED"
