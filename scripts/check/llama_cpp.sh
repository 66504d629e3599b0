#!/usr/bin/env bash
# llama.cpp (llama-cpp-python from PyPI) runs what lowrank exports, with the answers lowrank gives:
#  1. `lowrank export` of ADAPTER_DIR as a LoRA GGUF, applied by llama.cpp (`lora_path`) on an f32
#     GGUF of the default model, vs `lowrank generate --adapter` on the same f32 GGUF;
#  2. `lowrank merge --format gguf` of the adapter into the default model (f32), run by llama.cpp,
#     vs `lowrank generate --adapter` on the Q4_1 default model (whose dequantised weights it holds);
#  3. the same merge from an HF directory (`lowrank merge` without adapters writes one, tokenizer
#     files included), the GGUF tokenizer metadata rebuilt from tokenizer.json.
# Greedy, 16 new tokens, the first N held-out questions. f32 weights keep llama.cpp's quantized
# dot products out of the comparison.
#   scripts/check/llama_cpp.sh ADAPTER_DIR [N]
# Needs llama-cpp-python: $LOWRANK_LLAMA_PYTHON (default: the reference venv's python) must
# import llama_cpp (`scripts/reference/setup.sh --with-llama-cpp` builds it, ~15 min on two cores).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
adapter=$1; n=${2:-10}
source scripts/reference/env.sh
require_llama_cpp
py=$LLAMA_PY
cargo build -q --release -p lowrank-cli
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
lr=./target/release/lowrank
$lr merge --format gguf --dtype f32 --output "$work/base-f32.gguf"
$lr export --model "$work/base-f32.gguf" --adapter "$adapter" --output "$work/lora.gguf"
$lr merge --adapter "$adapter" --format gguf --dtype f32 --output "$work/merged-f32.gguf"
$lr merge --output "$work/base-hf"
$lr merge --model "$work/base-hf" --adapter "$adapter" --format gguf --dtype f32 --output "$work/from-hf.gguf"
source scripts/check/answers.sh
"$py" scripts/check/llamacpp_answers.py "$work/base-f32.gguf" "$work/lora.gguf" examples/dates/eval.jsonl "$n" > "$work/lora.jsonl"
echo "llama.cpp --lora (exported adapter) vs lowrank generate --adapter, f32 base:"
compare_answers "$work/lora.jsonl" --model "$work/base-f32.gguf" --adapter "$adapter"
# The adapter must matter: llama.cpp's answers without it differ.
"$py" scripts/check/llamacpp_answers.py "$work/base-f32.gguf" - examples/dates/eval.jsonl "$n" > "$work/base.jsonl"
changed=$(paste -d'\n' "$work/base.jsonl" "$work/lora.jsonl" | "$py" -c 'import sys,json; l=[json.loads(x) for x in sys.stdin]; print(sum(a["answer"]!=b["answer"] for a,b in zip(l[::2],l[1::2])))')
echo "the adapter changed $changed/$n of llama.cpp's answers"
[ "$changed" -gt 0 ]
"$py" scripts/check/llamacpp_answers.py "$work/merged-f32.gguf" - examples/dates/eval.jsonl "$n" > "$work/merged.jsonl"
echo "llama.cpp on the merged GGUF vs lowrank generate --adapter on the default model:"
compare_answers "$work/merged.jsonl" --adapter "$adapter"
"$py" scripts/check/llamacpp_answers.py "$work/from-hf.gguf" - examples/dates/eval.jsonl "$n" > "$work/from-hf.jsonl"
echo "llama.cpp on a GGUF merged from an HF directory vs lowrank generate --adapter on the default model:"
compare_answers "$work/from-hf.jsonl" --adapter "$adapter"
