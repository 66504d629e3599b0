# The reference stack's paths, for the scripts that compare lowrank with it. Source it:
#   source scripts/reference/env.sh; require_reference
# LOWRANK_REFERENCE (default ~/.cache/lowrank-reference) is where scripts/reference/setup.sh put it;
# LOWRANK_REF_PYTHON / LOWRANK_REF_MODEL override the interpreter / the f32 HF model alone.
LOWRANK_REFERENCE=${LOWRANK_REFERENCE:-$HOME/.cache/lowrank-reference}
export LOWRANK_REFERENCE
REF_PYTHON=${LOWRANK_REF_PYTHON:-$LOWRANK_REFERENCE/venv/bin/python}
REF_MODEL=${LOWRANK_REF_MODEL:-$LOWRANK_REFERENCE/smollm2-hf}
REF_MODEL_BF16=$LOWRANK_REFERENCE/smollm2-hf-bf16
REF_GGUF=$LOWRANK_REFERENCE/smollm2-gguf/SmolLM2-135M-Instruct.Q4_1.gguf
# llama.cpp's own converter (convert_hf_to_gguf.py, its conversion/ package and gguf-py), from the
# llama-cpp-python source package; nothing is built.
REF_LLAMA_CPP=$LOWRANK_REFERENCE/llama.cpp-src

# Exits with a hint unless the interpreter and the f32 model are there.
require_reference() {
    if [[ ! -x $REF_PYTHON || ! -d $REF_MODEL ]]; then
        echo "no reference stack: $REF_PYTHON or $REF_MODEL is missing" >&2
        echo "---> HINT: run scripts/reference/setup.sh (or set LOWRANK_REFERENCE to where it ran)" >&2
        exit 2
    fi
}

# Sets LLAMA_PY to a Python that imports llama_cpp ($LOWRANK_LLAMA_PYTHON, else the reference
# venv's), or exits with a hint.
require_llama_cpp() {
    LLAMA_PY=${LOWRANK_LLAMA_PYTHON:-$REF_PYTHON}
    if ! "$LLAMA_PY" -c 'import llama_cpp' 2>/dev/null; then
        echo "llama-cpp-python not found for $LLAMA_PY" >&2
        echo "---> HINT: run scripts/reference/setup.sh --with-llama-cpp (builds it, ~15 min on two cores)" >&2
        exit 2
    fi
}

# The release CLI the benchmarks run, in BIN (relative to the repository root).
require_release_bin() {
    BIN=target/release/lowrank
    [[ -x $BIN ]] || { echo "build first: cargo build --release -p lowrank-cli" >&2; exit 1; }
}

# An awk function for the bench tables: median(list) of a space-separated list of numbers.
# shellcheck disable=SC2034
AWK_MEDIAN='
    function median(list,   n, v, i, j, t) {
        n = split(list, v, " ")
        for (i = 2; i <= n; i++) for (j = i; j > 1 && v[j - 1] + 0 > v[j] + 0; j--) { t = v[j]; v[j] = v[j - 1]; v[j - 1] = t }
        return n % 2 ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
    }'
