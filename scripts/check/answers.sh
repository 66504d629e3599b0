# Sourced by the check scripts. `compare_answers REF_JSONL LOWRANK_ARGS...`: for each line of
# REF_JSONL ({"question", "answer"} from peft_roundtrip.py), runs `lowrank generate LOWRANK_ARGS
# --chat QUESTION --max-new-tokens 16` and counts identical answers; fails unless all are.
compare_answers() {
  local ref=$1; shift
  local same=0 total=0 q want got
  while IFS= read -r line; do
    q=$(printf '%s' "$line" | "$py" -c 'import json,sys; print(json.loads(sys.stdin.read())["question"])')
    want=$(printf '%s' "$line" | "$py" -c 'import json,sys; print(json.loads(sys.stdin.read())["answer"])')
    got=$(./target/release/lowrank generate "$@" --chat "$q" --max-new-tokens 16 | sed 's/[[:space:]]*$//')
    total=$((total + 1))
    if [ "$got" = "$want" ]; then same=$((same + 1)); else echo "differs: $q | reference: $want | lowrank: $got"; fi
  done < "$ref"
  echo "$same/$total answers identical"
  [ "$same" = "$total" ]
}
