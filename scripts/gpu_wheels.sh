#!/usr/bin/env bash
# Put into .whl/ the wheels a GPU machine without network lacks for scripts/gpu_check.sh
# (its image has PyTorch, NumPy, SentencePiece, sacreBLEU, TensorBoard, tqdm, PyYAML, pytest).
#   PYVER=3.12 scripts/gpu_wheels.sh      # the GPU machine's Python version
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${PYVER:-3.12}
mkdir -p .whl
# Pure Python: built or downloaded here as py3-none-any wheels.
python3 -m pip wheel -q --no-deps -w .whl \
    hydra-core omegaconf antlr4-python3-runtime==4.9.3 submitit hydra-submitit-launcher
# Compiled: the wheel for the GPU machine's Python and platform.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl ctranslate2
ls .whl
