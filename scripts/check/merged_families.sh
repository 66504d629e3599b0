#!/usr/bin/env bash
# `lowrank merge` of each new family's tiny model with its all-linear PEFT adapter
# (tests/fixtures/models/<family>/), loaded by transformers from the merged directory as that
# family's class, gives PEFT's base + adapter logits (models.py's `all_linear` case) within 1e-4.
#   scripts/check/merged_families.sh
# Needs the reference stack (scripts/reference/setup.sh; found through scripts/reference/env.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
source scripts/reference/env.sh; require_reference
cargo build -q --release -p lowrank-cli
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
fixtures=crates/lowrank/tests/fixtures/models
families=(qwen3 gemma2 gemma3 phi3)
for f in "${families[@]}"; do
    ./target/release/lowrank merge --model "$fixtures/$f/model" --adapter "$fixtures/$f/adapters/all_linear" \
        --output "$work/$f" 2>/dev/null
done
"$REF_PYTHON" - "$fixtures" "$work" "${families[@]}" <<'PY' 2>/dev/null
import json, sys, torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
fixtures, work, families = sys.argv[1], sys.argv[2], sys.argv[3:]
worst = 0.0
for f in families:
    model = AutoModelForCausalLM.from_pretrained(f"{work}/{f}", dtype=torch.float32, attn_implementation="eager").eval()
    want = load_file(f"{fixtures}/{f}/logits.safetensors")
    d = 0.0
    with torch.no_grad():
        for i, ids in enumerate(json.load(open(f"{fixtures}/{f}/ids.json"))):
            z = model(input_ids=torch.tensor([ids])).logits[0]
            d = max(d, (z - want[f"all_linear.{i}"]).abs().max().item())
    print(f"{f}: {type(model).__name__}, max |Δlogit| vs PEFT {d:.2e}")
    worst = max(worst, d)
sys.exit(0 if worst < 1e-4 else 1)
PY
