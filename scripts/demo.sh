#!/usr/bin/env bash
# The README demo: NExT-GPT's whole recipe on tiny models and synthetic data, on CPU.
# Stage 1 -> stage 2 (from stage 1's bundle) -> stage 3 (from stage 2's) -> text-to-X generation.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_SILENT=true
PY=.venv/bin/python
start=$(date +%s)
# resume=false: a second `make demo` trains again (the earlier bundles are kept as versions)
$PY train.py -m stage=1,2,3 experiment=demo resume=false "$@"
$PY -m nextgpt.generate --bundle bundles/stage3 --out outputs/demo \
  --prompt "Please make an image of a red circle at the top left on a black background" \
  --prompt "Please make an audio of a loud high pitched beeping tone" \
  --prompt "Please make a video of a green square moving to the right"
end=$(date +%s)
echo
echo "demo finished in $((end - start)) s. On disk:"
du -sh .cache/tiny_backbones .cache/synthetic bundles/stage1 bundles/stage2 bundles/stage3 checkpoints logs outputs/demo 2>/dev/null || true
echo "W&B (offline) runs: $(find logs -type d -name 'offline-run-*' | wc -l) under logs/; sync with: wandb sync <dir>"
