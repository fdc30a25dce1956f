#!/usr/bin/env bash
# Set up (if needed), then the main job on the embedded default: CIFAR-10 images from
# ../shared/data/cifar10 -> WebDataset shards -> purified shards with the shipped denoiser,
# plus a preview grid. Outputs land in demo-out/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
PY=.venv/bin/python
ES=.venv/bin/eclipse-stream

echo "== 1/3 CIFAR-10 -> WebDataset shards (20 training images per class)"
$PY -m tools.evaluate prepare --out demo-out/data --limit-per-class 20 --shard-size 100 --no-beton

echo "== 2/3 purify the shards with the shipped default denoiser"
# --overwrite: demo-out/ is this script's own, so a rerun after a default changed (t* 100 -> 200 on 2026-12-07)
# rewrites it instead of refusing shards made with the old settings (purify's guard for users' folders)
$ES purify demo-out/data/train demo-out/purified --batch-size 100 --overwrite

echo "== 3/3 preview: input / noised at t* / purified / corrupted"
$ES preview demo-out/data/train/train-000000.tar -o demo-out/preview.png

echo
echo "done: demo-out/purified/ (shards, <shard>.stats.json, manifest.json) and demo-out/preview.png"
