#!/usr/bin/env bash
# Reproduce the default quality model (crfiqa_mbf), its ablations and the evaluation in docs/model-card.md.
# About 1.5-2 hours on 2 CPU cores; every step resumes or skips what is already done.
set -euo pipefail
cd "$(dirname "$0")/.."
crfiqa=.venv/bin/crfiqa
shared=${CRFIQA_SHARED:-../shared}
bootstrap=${BOOTSTRAP:-1000}
$crfiqa models fetch --quiet --from "$shared/models"
[ -d runs/lfw_train ] || $crfiqa prepare "$shared/data/train" --out runs/lfw_train
for cfg in lfw_mbf lfw_mbf_on_top lfw_mbf_ccs lfw_mbf_official; do
  if [ -f "runs/$cfg/latest.pt" ]; then $crfiqa train --config "$cfg" --resume "runs/$cfg"; else $crfiqa train --config "$cfg"; fi
  [ -f "runs/export/$cfg.onnx" ] || $crfiqa export "runs/$cfg" --out "runs/export/$cfg.onnx" --reference runs/lfw_train --name "$cfg"
done
# The cross-quality set: half of the LFW dev images degraded before detection (seed 2026; training used 1234).
[ -d runs/lfw_dev_xq ] || $crfiqa degrade "$shared/data/lfw/images" --out runs/lfw_dev_xq --seed 2026 --fraction 0.5
for rec in sface_2021dec w600k_mbf; do
  for set in xq clean; do
    images="$shared/data/lfw/images"; [ "$set" = xq ] && images=runs/lfw_dev_xq
    [ -f "runs/eval/${set}_${rec}/report.json" ] && continue
    $crfiqa evaluate --all-vs-all "$images" --recognition "$rec" \
      --quality crfiqa_mbf=model:runs/export/lfw_mbf.onnx --quality on_top=model:runs/export/lfw_mbf_on_top.onnx \
      --quality ccs=model:runs/export/lfw_mbf_ccs.onnx --quality official=model:runs/export/lfw_mbf_official.onnx \
      --baseline random det_score eye_distance sharpness embedding_norm:w600k_mbf \
      --fmr 1e-3 1e-4 --protocol both --threshold-mode fixed --bootstrap "$bootstrap" --guidance crfiqa_mbf \
      --out "runs/eval/${set}_${rec}"
  done
done
