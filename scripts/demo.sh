#!/usr/bin/env bash
# The README demo: NExT-GPT's whole recipe on tiny models in the toy world (nextgpt/world), on CPU.
# The world backbones are built once (python -m nextgpt.world.build, cached under .cache/), then
# stage 1 -> stage 2 (from stage 1's bundle) -> stage 3 (from stage 2's) -> text-to-X generation ->
# a contact sheet of what was generated -> the world scorecard of the stage-3 bundle.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_SILENT=true
PY=.venv/bin/python
OUT=outputs/demo
SCORED=${DEMO_SCORED:-48}  # held-out items per scorecard task
start=$(date +%s)
$PY -m nextgpt.world.build --out .cache/world_backbones --backbones .cache/tiny_backbones >/dev/null
built=$(date +%s)
# resume=false: a second `make demo` trains again (the earlier bundles are kept as versions).
# Stage 2 takes more steps on larger batches than the others: the output projector first learns the
# mean conditioning and only then which caption was asked for (benchmarks/world_probe.py measures
# it: top-1 0.02 after 360 steps of 8, 0.66 after 1,800 of 32). Stage 3 at a third of the learning
# rate: at 3e-3 its instruction data undid that (0.01), at 1e-3 it keeps part (0.26).
$PY train.py stage=1 experiment=demo resume=false "$@"
$PY train.py stage=2 experiment=demo resume=false stage.batch_size=32 trainer.max_steps=1800 trainer.max_epochs=-1 "$@"
$PY train.py stage=3 experiment=demo resume=false stage.optim.lr=1e-3 "$@"
rm -rf "$OUT"
$PY -m nextgpt.generate --bundle bundles/stage3 --out "$OUT" \
  --prompt "Please make an image of a red circle at the top left on a black background" \
  --prompt "Would you make a picture of a blue square at the bottom right on a grey background for me?" \
  --prompt "Send me a drawing of a yellow triangle in the centre on a black background." \
  --prompt "Please make an audio of a loud high pitched beeping tone" \
  --prompt "Send me a video of a green square moving to the right."
$PY -m nextgpt.contact_sheet "$OUT"
$PY evaluate.py -m task=world_i2t,world_a2t,world_v2t,world_t2i,world_t2a,world_t2v checkpoint=bundles/stage3 \
  limit="$SCORED" hydra.sweep.dir="$OUT/scorecard" hydra.sweep.subdir='${task.name}' >/dev/null
echo
$PY -m nextgpt.world.scorecard "$OUT/scorecard" --out "$OUT"
end=$(date +%s)
echo
echo "demo finished in $((end - start)) s ($((built - start)) s of it the world build; cached from now on). On disk:"
du -sh .cache/tiny_backbones .cache/world_backbones .cache/world_data bundles/stage1 bundles/stage2 bundles/stage3 checkpoints logs "$OUT" 2>/dev/null || true
echo "contact sheet: $OUT/contact_sheet.png  scorecard: $OUT/scorecard.md"
echo "W&B (offline) runs: $(find logs -type d -name 'offline-run-*' | wc -l) under logs/; sync with: wandb sync <dir>"
