#!/usr/bin/env bash
# Wheels the GPU machine's image lacks, for benchmarks/gpu_check.py, into .whl/ (git-ignored):
# CPython 3.12 x86-64 builds at the versions installed in .venv here (what the CPU tests ran with).
# The image has torch, transformers, peft and lightning; everything else train.py imports travels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
binary=(hydra-core omegaconf diffusers webdataset braceexpand av soundfile cffi pycparser hjson pydantic pydantic-core
        annotated-types typing-inspection importlib-metadata)
pins=()
for name in "${binary[@]}"; do pins+=("$name==$(version "$name")"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${pins[@]}"
# published as source only: build pure-Python wheels here (DeepSpeed's ops compile on first use there)
"$PY" -m pip wheel -q --no-deps -w .whl "antlr4-python3-runtime==$(version antlr4-python3-runtime)"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==$(version deepspeed)"
du -sh .whl
ls .whl
