#!/usr/bin/env bash
# Reproduces rdeic/models/rdeic-tiny-demo from photographs installed with scikit-image and matplotlib
# plus the freely licensed photographs of Debian's desktop-background packages that photos.json lists.
# Run from the repository root in the project's environment with the demo extra (scikit-image), on a
# Debian/Ubuntu machine that can reach its package mirror (run `apt-get update` once before):
#   pip install -c requirements.lock -e ".[demo]" && bash rdeic/models/rdeic-tiny-demo/recipe/train.sh
set -euo pipefail
recipe=rdeic/models/rdeic-tiny-demo/recipe
python "$recipe/prepare_data.py" --out out/demo-data --examples examples/shards --debian-photos out/debs --download
for stage in vae vae_refine vae_natural denoiser stage1 stage2; do
  rdeic train --config "$recipe/$stage.yaml"
done
python "$recipe/export.py" out/demo-train/stage2/final rdeic/models/rdeic-tiny-demo
rdeic eval --images out/demo-data/eval --model rdeic/models/rdeic-tiny-demo --baselines jpeg,webp,avif --out out/demo-eval
