#!/usr/bin/env bash
# The segment job's GPU figures in one run (≤ 5 minutes on a 16-core GPU host), into $OUT:
#   1. the 40000² px MoNuSeg mosaic at 0.25 µm/px, written once (~2 minutes on 16 cores);
#   2. benchmarks/segment.py on it with the shipped default: end to end, the predictor alone,
#      reads alone, the profile of where the seconds go, CPU/GPU busy, memory; then end to end
#      again with the instances found by CPU tasks (scipy), not in the predictor (tensors);
#   3. benchmarks/scaling.py with 1, 2 and 4 simulated CPU nodes beside one GPU node;
#   4. benchmarks/instances.py: instance extraction per tile, scipy on a core vs tensors on the GPU.
# Each step prints one JSON line (also kept in $OUT/*.json). Dry run on a CPU machine:
#   SIZE=4096 NODES="1" CPUS=1 DEVICE=cpu OUT=/tmp/perf \
#   SCALING_ARGS="--size 4096 --small-size 2048 --tile 256 --overlap 32 --base-channels 4" \
#   bash benchmarks/gpu_perf.sh
# On the lent GPU host, whose image lacks orjson, build the bundle with it:
#   EXTRA_PKGS=orjson ../shared/tools/device-bundle
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-perf}
DATA=${DATA:-../shared/data}
SIZE=${SIZE:-40000}
NODES=${NODES:-1 2 4}
CPUS=${CPUS:-3}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
slide="$OUT/mosaic-$SIZE.tiff"
[ -f "$slide" ] || wsi-pipeline synth-slide --tiles "$DATA/monuseg_train" \
    --size "${SIZE}x${SIZE}" --mpp 0.25 --out "$slide" --truth "$OUT/mosaic-$SIZE.truth.geojson.gz"
python benchmarks/segment.py --slide "$slide" --device "$DEVICE" --batch-size 32 \
    | tee "$OUT/segment.json"
python benchmarks/segment.py --slide "$slide" --device "$DEVICE" --batch-size 32 --e2e-only \
    --no-tensor-instances | tee "$OUT/segment-scipy-instances.json"
# shellcheck disable=SC2086
python benchmarks/scaling.py --nodes $NODES --cpus-per-node "$CPUS" --device "$DEVICE" \
    ${SCALING_ARGS:-} | tee "$OUT/scaling.json"
python benchmarks/instances.py --data "$DATA/monuseg_train" --device "$DEVICE" --tiles 64 \
    --batch-size 32 | tee "$OUT/instances.json"
