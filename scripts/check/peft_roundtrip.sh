#!/usr/bin/env bash
# An adapter trained by lowrank, loaded by PEFT on the HF form of the default model, answers the
# held-out questions exactly as `lowrank generate --adapter` does (greedy, 16 new tokens).
#   scripts/check/peft_roundtrip.sh ADAPTER_DIR [N]
#   QUANTIZE=nf4 scripts/check/peft_roundtrip.sh ADAPTER_DIR [N]   # a QLoRA adapter: PEFT on the
#       base loaded in bitsandbytes NF4, lowrank generate --quantize nf4 (needs bitsandbytes)
# Needs the reference stack (scripts/reference/setup.sh; found through scripts/reference/env.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
adapter=$1; n=${2:-10}
source scripts/reference/env.sh; require_reference
py=$REF_PYTHON hf=$REF_MODEL
cargo build -q --release -p lowrank-cli
ref=$(mktemp); trap 'rm -f "$ref"' EXIT
quantize=${QUANTIZE:-}
QUANTIZE=$quantize "$py" scripts/check/peft_roundtrip.py "$adapter" "$hf" examples/dates/eval.jsonl "$n" > "$ref"
source scripts/check/answers.sh
echo "PEFT on $hf ${quantize:+(bitsandbytes $quantize) }vs lowrank generate${quantize:+ --quantize $quantize}:"
compare_answers "$ref" --model "$hf" --adapter "$adapter" ${quantize:+--quantize "$quantize"}
