#!/usr/bin/env bash
# Gemma 3 with its vision tower (tests/fixtures/models/gemma3mm/, scripts/fixtures/multimodal.py)
# through lowrank and back into transformers/PEFT:
#  1. `lowrank merge` of PEFT's q/v adapter loads in transformers as Gemma3ForConditionalGeneration,
#     gives PEFT's text-only logits within 1e-4, and carries the base's vision tower and projector
#     bit for bit (the adapter's vision-tower layers are not merged: lowrank runs the text model);
#  2. `lowrank train` on the multimodal directory writes an adapter that PEFT loads onto
#     Gemma3ForConditionalGeneration (only text modules adapted) and that greedy-decodes there
#     as `lowrank generate --adapter` does.
#   scripts/check/gemma3_multimodal.sh
# Needs the reference stack (scripts/reference/setup.sh; found through scripts/reference/env.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
source scripts/reference/env.sh; require_reference
cargo build -q --release -p lowrank-cli
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
lr=./target/release/lowrank
mm=crates/lowrank/tests/fixtures/models/gemma3mm
$lr merge --model "$mm/model" --adapter "$mm/adapters/qv" --output "$work/merged"
for i in $(seq 0 15); do echo "{\"prompt\": \"the $i\", \"completion\": \" he$i the$i\"}"; done > "$work/train.jsonl"
$lr train --model "$mm/model" --data "$work/train.jsonl" --output "$work/run" --steps 30 --batch-size 4 --rank 4 \
    --lr 3e-2 2>/dev/null
prompt="the the"
ours=$($lr generate --verbose --model "$mm/model" --adapter "$work/run" --prompt "$prompt" --max-new-tokens 12 2>&1 >/dev/null |
    sed -n 's/^generated ids: //p')
base=$($lr generate --verbose --model "$mm/model" --prompt "$prompt" --max-new-tokens 12 2>&1 >/dev/null |
    sed -n 's/^generated ids: //p')
"$REF_PYTHON" - "$mm" "$work" "$prompt" "$ours" "$base" <<'PY' 2>/dev/null
import json, sys, torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoTokenizer, Gemma3ForConditionalGeneration
mm, work, prompt, ours, base = sys.argv[1:6]
load = lambda d: Gemma3ForConditionalGeneration.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
merged = load(f"{work}/merged")
want = load_file(f"{mm}/logits.safetensors")
d = 0.0
with torch.no_grad():
    for i, ids in enumerate(json.load(open(f"{mm}/../gemma3/ids.json"))):
        d = max(d, (merged(input_ids=torch.tensor([ids])).logits[0] - want[f"qv.{i}"]).abs().max().item())
orig = load(f"{mm}/model").state_dict()
tower = [k for k in orig if "vision_tower" in k or "multi_modal_projector" in k]
same = all(torch.equal(orig[k], merged.state_dict()[k]) for k in tower)
print(f"merged: {type(merged).__name__}, max |Δlogit| vs PEFT {d:.2e}; vision tower and projector "
      f"({len(tower)} tensors) as in the base: {same}")
peft = PeftModel.from_pretrained(load(f"{mm}/model"), f"{work}/run").eval()
adapted = sorted({n.split(".lora_A")[0] for n, _ in peft.named_parameters() if "lora_A" in n})
text_only = all(".language_model." in n for n in adapted)
tok = AutoTokenizer.from_pretrained(f"{mm}/model")
ids = tok(prompt, return_tensors="pt").input_ids
with torch.no_grad():
    out = peft.generate(input_ids=ids, max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=0)
new = out[0, ids.shape[1]:].tolist()
new = new[:new.index(tok.eos_token_id)] if tok.eos_token_id in new else new  # lowrank's ids leave out the eos
theirs = "[" + ", ".join(map(str, new)) + "]"
print(f"PEFT on the trained adapter: {len(adapted)} modules, all in the text model: {text_only}; greedy ids "
      f"{theirs}, lowrank {ours} (without the adapter {base})")
sys.exit(0 if d < 1e-4 and same and text_only and theirs == ours and ours != base else 1)
PY
