#!/usr/bin/env bash
# `kill -9` at random moments of `lowrank train --save-every 1`, then `--resume` (killed again at
# random while resuming, until a resume finishes): every trial must end with the adapter of an
# uninterrupted run, byte for byte (adapter_model.safetensors, and metrics.jsonl without timings).
# On the tiny Qwen3 fixture (60 steps of 4 x 1 with dropout, a checkpoint every step), so the
# kills land in writes of the adapter, optimizer state, `latest` and metrics as often as in steps.
#   scripts/check/crash_resume.sh [TRIALS]     # default 40
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
trials=${1:-40}
cargo build -q --release -p lowrank-cli
lr=$PWD/target/release/lowrank
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
model=crates/lowrank/tests/fixtures/models/qwen3/model
for i in $(seq 0 31); do echo "{\"prompt\": \"the $i\", \"completion\": \" he$i the$i\"}"; done > "$work/train.jsonl"
args=(--model "$model" --data "$work/train.jsonl" --steps 60 --batch-size 4 --rank 4 --lr 3e-2 --dropout 0.1
      --save-every 1 --seed 3)
"$lr" train "${args[@]}" --output "$work/ref" >/dev/null 2>&1
want=$(sha256sum < "$work/ref/adapter_model.safetensors")
metrics() { python3 -c 'import json,sys; [print(json.dumps({k: v for k, v in json.loads(l).items() if k != "tokens_per_s"})) for l in open(sys.argv[1])]' "$1"; }
want_metrics=$(metrics "$work/ref/metrics.jsonl")
start=$(date +%s%N); "$lr" train "${args[@]}" --output "$work/timing" >/dev/null 2>&1; end=$(date +%s%N)
run_ms=$(( (end - start) / 1000000 ))
ok=0 kills=0
for t in $(seq 1 "$trials"); do
    out=$work/t$t
    cmd=("$lr" train "${args[@]}" --output "$out")
    while :; do
        "${cmd[@]}" >/dev/null 2>&1 &
        pid=$!
        sleep "$(python3 -c "import random; print(random.uniform(0, 0.9 * $run_ms / 1000))")"
        if kill -9 "$pid" 2>/dev/null; then
            kills=$((kills + 1))
            wait "$pid" 2>/dev/null || true
            # Resume if a checkpoint was written, else start over.
            if [[ -f $out/checkpoints/latest ]]; then cmd=("$lr" train --resume "$out"); else rm -rf "$out"; cmd=("$lr" train "${args[@]}" --output "$out"); fi
        else
            wait "$pid" && break
            echo "trial $t: the run failed after a kill" >&2; exit 1
        fi
    done
    if [[ $(sha256sum < "$out/adapter_model.safetensors") != "$want" ]]; then
        echo "trial $t: the adapter differs from the uninterrupted run" >&2
    elif [[ $(metrics "$out/metrics.jsonl") != "$want_metrics" ]]; then
        echo "trial $t: metrics.jsonl differs from the uninterrupted run:" >&2
        diff <(echo "$want_metrics") <(metrics "$out/metrics.jsonl") | head -4 >&2 || true
    else
        ok=$((ok + 1))
    fi
    rm -rf "$out"
done
echo "crash_resume: $ok/$trials trials ended byte for byte as the uninterrupted run, after $kills kill -9s (run ${run_ms} ms)"
[[ $ok == "$trials" ]]
