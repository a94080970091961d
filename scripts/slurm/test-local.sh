#!/usr/bin/env bash
# The Slurm path for real: a one-node cluster on localhost (local-cluster.sh), the fixture
# benchmark submitted as a 2-task job array with the fixture model on the CPU (submit-eval.sh),
# the merge as a dependent job, and the summary checked. Run by CI; needs root for the packages.
set -euo pipefail
cd "$(dirname "$0")/../.."

state=$(mktemp -d /tmp/vlm-slurm.XXXXXX)
output=$state/results
trap 'scripts/slurm/local-cluster.sh stop "$state"' EXIT

export VLM_EVAL=${VLM_EVAL:-target/debug/examples/eval}
[ -x "$VLM_EVAL" ] || cargo build --quiet --example eval

scripts/slurm/local-cluster.sh start "$state"
export SLURM_CONF=$state/slurm.conf
DEVICE=cpu EVAL_ARGS="--max-new-tokens 4" scripts/slurm/submit-eval.sh \
    tests/fixtures/models/internvl3-hf tests/fixtures/eval/bench.jsonl "$output" 2

for _ in $(seq 300); do
    [ -z "$(squeue -h -o %i)" ] && break
    sleep 1
done
[ -z "$(squeue -h -o %i)" ] || { echo "jobs still queued after 300 s:"; squeue; exit 1; }

echo "== logs"
tail -n +1 "$output"/logs/*.log
echo "== summary"
cat "$output/summary.json"
python3 - "$output" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
summary = json.loads((out / "summary.json").read_text())
assert summary["complete"] and summary["expected"] == summary["answered"] == 10, summary
assert sorted(p.name for p in out.glob("predictions.*-of-*.jsonl")) == ["predictions.0-of-2.jsonl", "predictions.1-of-2.jsonl"]
shards = [len((out / f"predictions.{i}-of-2.jsonl").read_text().splitlines()) for i in range(2)]
assert shards == [5, 5], shards
print(f"slurm eval: 2 array tasks answered {shards} items, merge complete, score {summary['score']:.3f}")
PY
