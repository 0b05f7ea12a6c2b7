#!/usr/bin/env bash
# Build (once) the venv of the benchmarks' outside tools, outside the repo: the peer routers kvroute
# is compared with (sglang-router, vllm-router) and py-spy (benchmarks.profile_proxy); all three are
# Rust binaries shipped as registry wheels.
# Wheels only (--only-binary): nothing compiles on the user's machine. Prints the venv's path;
# the path carries the recipe's hash, so a changed recipe builds a new venv.
set -euo pipefail
PYTHON="${PYTHON:-python3}"
PACKAGES="sglang-router==0.3.2 vllm-router==0.1.17 py-spy==0.4.1"
recipe_hash=$(echo "$PYTHON|$PACKAGES" | sha256sum | cut -c1-12)
root="${KVROUTE_CACHE:-$HOME/.cache/kvroute}"
venv="$root/peer-routers-$recipe_hash"
if [ -f "$venv/.installed" ]; then echo "$venv"; exit 0; fi
mkdir -p "$root"
rm -rf "$venv"
echo "building the peer routers' venv at $venv (once; ~1 min)" >&2
"$PYTHON" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip >&2
"$venv/bin/python" -m pip install -q --only-binary=:all: $PACKAGES >&2
"$venv/bin/python" -c "import sglang_router" >&2
test -x "$venv/bin/vllm-router"
test -x "$venv/bin/py-spy"
touch "$venv/.installed"
echo "$venv"
