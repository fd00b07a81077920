#!/usr/bin/env bash
# Gathers what bench/gpu_step.py needs beyond the device image's JAX/flax/optax/orbax/chex into build/gpu_site/
# (pure-Python packages copied from this checkout's .venv: ml_collections). On the device:
#     PYTHONPATH=.:build/gpu_site python bench/gpu_step.py --out "$OUT"
# (the device tool's `carry` takes build/gpu_site along; build/ is git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
site=$(.venv/bin/python -c "import ml_collections, os; print(os.path.dirname(os.path.dirname(ml_collections.__file__)))")
rm -rf build/gpu_site && mkdir -p build/gpu_site
cp -r "$site/ml_collections" build/gpu_site/
echo "build/gpu_site: $(du -sh build/gpu_site | cut -f1) ($(ls build/gpu_site | tr '\n' ' '))"
