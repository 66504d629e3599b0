#!/usr/bin/env bash
# An adapter trained by lowrank, loaded by PEFT on the HF form of the default model, answers the
# held-out questions exactly as `lowrank generate --adapter` does (greedy, 16 new tokens).
#   scripts/check/peft_roundtrip.sh ADAPTER_DIR [N]
# Needs the reference stack (../shared/reference/setup.sh): $LOWRANK_REF_PYTHON and
# $LOWRANK_REF_MODEL default to ~/.cache/lowrank-reference/{venv/bin/python,smollm2-hf}.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
adapter=$1; n=${2:-10}
py=${LOWRANK_REF_PYTHON:-$HOME/.cache/lowrank-reference/venv/bin/python}
hf=${LOWRANK_REF_MODEL:-$HOME/.cache/lowrank-reference/smollm2-hf}
[ -x "$py" ] && [ -d "$hf" ] || { echo "reference stack not found ($py, $hf): run ../shared/reference/setup.sh"; exit 2; }
cargo build -q --release -p lowrank-cli
ref=$(mktemp)
"$py" scripts/check/peft_roundtrip.py "$adapter" "$hf" examples/data/eval.jsonl "$n" > "$ref"
same=0; total=0
while IFS= read -r line; do
  q=$(printf '%s' "$line" | "$py" -c 'import json,sys; print(json.loads(sys.stdin.read())["question"])')
  want=$(printf '%s' "$line" | "$py" -c 'import json,sys; print(json.loads(sys.stdin.read())["answer"])')
  got=$(./target/release/lowrank generate --model "$hf" --adapter "$adapter" --chat "$q" --max-new-tokens 16 | sed 's/[[:space:]]*$//')
  total=$((total + 1))
  if [ "$got" = "$want" ]; then same=$((same + 1)); else echo "differs: $q | peft: $want | lowrank: $got"; fi
done < "$ref"
rm -f "$ref"
echo "$same/$total answers identical (PEFT on $hf vs lowrank generate)"
[ "$same" = "$total" ]
