#!/usr/bin/env bash
# Submits a benchmark as a Slurm job array of SHARDS tasks (one GPU each), then the merge as a job
# that starts when they have all ended. Prints the two job ids.
#
#   scripts/slurm/submit-eval.sh MODEL BENCHMARK OUTPUT SHARDS [sbatch options...]
#
# Environment: VLM_EVAL (default target/release/examples/eval, built with
# `cargo build --release --features cuda --example eval`), DEVICE (default cuda), EVAL_ARGS (more
# `eval run` flags, e.g. "--batch-size 16 --max-tiles 6"). Logs go to OUTPUT/logs/.
set -euo pipefail
cd "$(dirname "$0")/../.."

if [ $# -lt 4 ]; then
    sed -n '2,10p' "$0" >&2
    exit 2
fi
model=$1 benchmark=$2 output=$3 shards=$4
shift 4

export VLM_EVAL=$(realpath "${VLM_EVAL:-target/release/examples/eval}")
export MODEL=$model BENCHMARK=$(realpath "$benchmark") OUTPUT=$(realpath -m "$output")
export DEVICE=${DEVICE:-cuda} EVAL_ARGS=${EVAL_ARGS:-}
[ -x "$VLM_EVAL" ] || { echo "no eval binary at $VLM_EVAL: build it first (see above)" >&2; exit 1; }
mkdir -p "$OUTPUT/logs"

array=$(sbatch --parsable --array="0-$((shards - 1))" --output="$OUTPUT/logs/eval-%A_%a.log" \
    --export=ALL "$@" scripts/slurm/eval-array.sbatch)
merge=$(sbatch --parsable --dependency="afterany:${array%%;*}" --output="$OUTPUT/logs/merge-%j.log" \
    --export=ALL "$@" scripts/slurm/eval-merge.sbatch)
echo "array job $array ($shards tasks), merge job $merge; results in $OUTPUT"
