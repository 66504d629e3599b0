#!/usr/bin/env bash
# llama.cpp (llama-cpp-python) applies the LoRA GGUFs lowrank exports for the families beyond
# Llama, and greedy-decodes as `lowrank generate --adapter` does: for each tiny model of
# tests/fixtures/models/<family>/ (Qwen3, Gemma 2, Gemma 3, Phi-3), its F32 GGUF written by
# llama.cpp's own converter (scripts/fixtures/converted.py) as the base and each of its PEFT
# fixture adapters (Phi-3: on the fused qkv_proj/gate_up_proj, and all-linear), three prompts,
# 12 new greedy token ids, until an end-of-generation token. The adapter must change llama.cpp's
# tokens for at least one prompt.
#   scripts/check/llama_cpp_families.sh
# Needs llama-cpp-python: $LOWRANK_LLAMA_PYTHON (default: the reference venv's python) must
# import llama_cpp (`scripts/reference/setup.sh --with-llama-cpp` builds it, ~15 min on two cores).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
source scripts/reference/env.sh
require_llama_cpp
py=$LLAMA_PY
cargo build -q --release -p lowrank-cli
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
lr=./target/release/lowrank
fixtures=crates/lowrank/tests/fixtures/models
# Phi-3's prompts pass its original context of 8 tokens, where llama.cpp (which picks LongRoPE's
# factors by its context size, 128 here) and transformers (by the sequence's length) agree.
prompts=("the theme of the thing" "Hello, how are you? the other three" "think them through 0123")
fail=0
for family in qwen3 gemma2 gemma3 phi3; do
    base=$fixtures/$family/gguf/tiny-F32.gguf
    for adapter in "$fixtures/$family"/adapters/*/; do
        adapter=${adapter%/}; name=$family/$(basename "$adapter")
        rm -f "$work/lora.gguf"
        $lr export --model "$base" --adapter "$adapter" --output "$work/lora.gguf" 2>/dev/null
        same=0 changed=0
        for prompt in "${prompts[@]}"; do
            ours=$($lr generate --verbose --model "$base" --adapter "$adapter" --prompt "$prompt" --max-new-tokens 12 2>&1 >/dev/null |
                sed -n 's/^generated ids: //p')
            theirs=$("$py" scripts/check/llamacpp_greedy.py "$base" "$work/lora.gguf" "$prompt" 12)
            plain=$("$py" scripts/check/llamacpp_greedy.py "$base" - "$prompt" 12)
            if [[ $ours == "$theirs" ]]; then same=$((same + 1)); else
                echo "  $name, \"$prompt\": lowrank $ours, llama.cpp $theirs"; fi
            [[ $plain != "$theirs" ]] && changed=$((changed + 1))
        done
        echo "$name: llama.cpp --lora = lowrank --adapter on ${same}/${#prompts[@]} prompts; the adapter changed llama.cpp's answer on ${changed}"
        [[ $same == "${#prompts[@]}" && $changed -gt 0 ]] || fail=1
    done
done
exit $fail
