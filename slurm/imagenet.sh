#!/usr/bin/env bash
# Ready `dcluster submit` commands for DeepCluster on ImageNet: 1 GPU, 1 node x 8 GPUs and
# 4 nodes x 8 GPUs, and the evaluation of the run each one trains (docs/distributed.md,
# "Ready scripts for ImageNet").
#
#   slurm/imagenet.sh SIZE [train | linear | knn | clusters] [--dry-run] [key=value ...]
#       SIZE: 1gpu | 8gpu | 32gpu       e.g. slurm/imagenet.sh 8gpu --dry-run
#
# Set once for your cluster (environment variables; defaults in brackets):
#   DCLUSTER_VENV  the virtualenv to activate [the active one]; the job runs this environment's
#                  Python by its path, so it must be on storage every node sees
#   PARTITION      the GPU partition (`sinfo` lists them); required unless --dry-run
#   IMAGENET       ImageNet's root [/datasets/imagenet]: train/ (class folders), val/ (the 50,000
#                  images as they ship) and LOC_val_solution.csv (or pass eval.val_labels=...)
#   PRESET         alexnet | vgg16 | resnet50 [resnet50]: configs/deepcluster_<PRESET>_imagenet.yaml
#   RUNS_ROOT      where the run directory goes [runs, under the current directory]; on shared
#                  storage
#   NAME           the run's name [deepcluster_<PRESET>_<SIZE>]
#   TIME_MIN       minutes per job [4320 to train, requeued after it; 600 to evaluate]
#
# What each size asks Slurm for, per node (the rules, docs/distributed.md):
#   --gpus-per-node G, one task per GPU; --nodes 1 or 4
#   --cpus-per-task: left to dcluster's one rule, data.workers + 2 (10 with the presets' 8)
#   --mem 24 + 8 x G GB: 8 GB per task (4 GB for the process, its CUDA libraries and DALI, and
#     0.5 GB per decoding worker) plus 24 GB for ImageNet's per-image arrays on one node (all of
#     a rank's feature rows in host memory, N x (4096 + 256) float32, the worst case of
#     benchmarks/cost_model.py). An allowance by arithmetic: not measured on a GPU node.
# Logs: <RUNS_ROOT>/<NAME>/slurm/ (the job's), <RUNS_ROOT>/<NAME>/train.log (the run's).
set -euo pipefail

usage() { sed -n '6,7p' "$0" | sed 's/^# \{0,3\}//' >&2; exit 2; }
[ $# -ge 1 ] || usage
SIZE=$1; shift
case "$SIZE" in
    1gpu)  NODES=1; GPUS=1 ;;
    8gpu)  NODES=1; GPUS=8 ;;
    32gpu) NODES=4; GPUS=8 ;;
    *) echo "slurm/imagenet.sh: SIZE must be 1gpu, 8gpu or 32gpu, not '$SIZE'" >&2; usage ;;
esac
ACTION=train
case "${1:-}" in
    train | linear | knn | clusters) ACTION=$1; shift ;;
esac
DRY=()
OVERRIDES=()
for arg in "$@"; do
    if [ "$arg" = "--dry-run" ]; then DRY=(--dry-run); else OVERRIDES+=("$arg"); fi
done

if [ -n "${DCLUSTER_VENV:-}" ]; then
    # shellcheck disable=SC1091
    source "$DCLUSTER_VENV/bin/activate"
fi
PRESET=${PRESET:-resnet50}
CONFIG="$(cd "$(dirname "$0")/.." && pwd)/configs/deepcluster_${PRESET}_imagenet.yaml"
IMAGENET=${IMAGENET:-/datasets/imagenet}
RUNS_ROOT=${RUNS_ROOT:-runs}
NAME=${NAME:-deepcluster_${PRESET}_${SIZE}}
MEM_GB=$((24 + 8 * GPUS))

SLURM=(--nodes "$NODES" --gpus-per-node "$GPUS" --mem "$MEM_GB")
if [ -n "${PARTITION:-}" ]; then
    SLURM+=(--partition "$PARTITION")
elif [ ${#DRY[@]} -eq 0 ]; then
    echo "slurm/imagenet.sh: set PARTITION to your GPU partition (sinfo lists them)" >&2
    exit 2
fi

if [ "$ACTION" = train ]; then
    exec python -m dcluster submit "$CONFIG" "name=$NAME" "runs_root=$RUNS_ROOT" \
        "data.path=$IMAGENET/train" ${OVERRIDES[@]+"${OVERRIDES[@]}"} \
        "${SLURM[@]}" --time "${TIME_MIN:-4320}" ${DRY[@]+"${DRY[@]}"}
fi
exec python -m dcluster submit "$RUNS_ROOT/$NAME" "eval.val_path=$IMAGENET/val" \
    "eval.val_labels=$IMAGENET/LOC_val_solution.csv" ${OVERRIDES[@]+"${OVERRIDES[@]}"} \
    --eval "$ACTION" "${SLURM[@]}" --time "${TIME_MIN:-600}" ${DRY[@]+"${DRY[@]}"}
