#!/usr/bin/env bash
# Load test and throughput of `lowrank serve` on the default model; see scripts/bench/serve.py.
#   scripts/bench/serve.sh [--clients 64] [--requests 256] [--max-tokens 32] [--dtype f32|bf16]
# Needs a Python with numpy and safetensors (the reference stack's, scripts/reference/env.sh);
# llama-cpp-python in it adds the llama.cpp single-stream figure.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
source scripts/reference/env.sh
py=$REF_PYTHON
cargo build -q --release -p lowrank-cli
gguf=${LOWRANK_HOME:-$HOME/.cache/lowrank}/models/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$gguf" ] || ./target/release/lowrank inspect > /dev/null  # fetches the default model
"$py" scripts/bench/serve.py ./target/release/lowrank "$gguf" "$@"
