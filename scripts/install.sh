#!/usr/bin/env bash
# Create .venv/ in the repository root and install the project with its test tools.
# torch comes first and pinned: 2.13.0 is the CPU wheel this machine carries; letting pip pick
# torch itself pulls a multi-GB CUDA build. On a GPU machine, install your CUDA torch into
# .venv first: this script keeps any torch already there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "torch==2.13.0"
fi
.venv/bin/python -m pip install -q -e ".[test,lint]"
# DeepSpeed (strategy=deepspeed_*): without build isolation, so its build sees the torch above
# instead of pulling another one; DS_BUILD_OPS=0 leaves its C++/CUDA ops to JIT on first use.
if ! .venv/bin/python -c "import deepspeed" 2>/dev/null; then
  DS_BUILD_OPS=0 .venv/bin/python -m pip install -q --no-build-isolation "deepspeed>=0.14"
fi
.venv/bin/python - <<'PY'
import importlib
for m in ("torch", "lightning", "hydra", "omegaconf", "transformers", "peft", "diffusers", "wandb", "webdataset", "av", "soundfile", "deepspeed"):
    mod = importlib.import_module(m)
    print(f"  {m:13s} {getattr(mod, '__version__', '?')}")
for absent in ("torchvision", "torchaudio"):
    try:
        importlib.import_module(absent)
        print(f"  note: {absent} is installed but not used")
    except Exception:
        pass
PY
touch .venv/.installed
