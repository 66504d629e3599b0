#!/usr/bin/env bash
# `lowrank merge` of an adapter into the default model (Q4_1 GGUF), loaded by transformers as a
# plain model with the tokenizer files lowrank wrote, answers the held-out questions exactly as
# `lowrank generate --adapter` does on the GGUF (greedy, 16 new tokens), and as lowrank does on
# the merged directory.
#   scripts/check/merged_hf.sh ADAPTER_DIR [N]
# Needs the reference stack (scripts/reference/setup.sh; found through scripts/reference/env.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
adapter=$1; n=${2:-10}
source scripts/reference/env.sh; require_reference
py=$REF_PYTHON
cargo build -q --release -p lowrank-cli
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
./target/release/lowrank merge --adapter "$adapter" --output "$work/merged"
"$py" scripts/check/peft_roundtrip.py - "$work/merged" examples/dates/eval.jsonl "$n" > "$work/ref"
source scripts/check/answers.sh
echo "transformers on the merged directory vs lowrank generate --adapter on the GGUF:"
compare_answers "$work/ref" --adapter "$adapter"
echo "transformers vs lowrank on the merged directory:"
compare_answers "$work/ref" --model "$work/merged"
