#!/usr/bin/env bash
# Generation throughput of the default model (SmolLM2-135M-Instruct) on CPU: lowrank against
# transformers + PEFT. Prefill and greedy decode tokens/s, without an adapter and with a LoRA
# adapter (r 16, alpha 32, all seven projections, B non-zero); 8-sequence batch decode too.
#
#   scripts/bench/generate.sh                   # from any directory
#   REPS=9 THREADS=2 scripts/bench/generate.sh  # knobs: REPS WARMUP PROMPT DECODE BATCH THREADS DTYPE
#   DTYPE=bf16 scripts/bench/generate.sh        # lowrank's prefill (and batches over 16 rows) in bf16
#
# 1. builds and runs `cargo bench -p lowrank --bench generate` (crates/lowrank/benches/generate.rs;
#    bench profile = release): the GGUF as loaded (Q4_1) and dequantised to f32;
# 2. runs scripts/bench/transformers_generate.py with the reference stack's Python on its f32 HF
#    form of the default model (scripts/reference/setup.sh, scripts/reference/env.sh), if there;
# 3. runs scripts/bench/llama_cpp_generate.py on the Q4_1 GGUF (llama-cpp-python's low-level API,
#    no adapter), if the reference Python imports llama_cpp (scripts/reference/setup.sh
#    --with-llama-cpp);
# 4. prints the tables, lowrank / transformers for each row, and lowrank / llama.cpp for the
#    adapter-free rows.
#
# Defaults: prompt 128 tokens, 64 decoded tokens, median of 5 after 1 warm-up, 2 threads, batch 8.
# Takes about 10 minutes on two cores after the build. Timings are only as quiet as the machine:
# run it with nothing else busy; per-repetition seconds go to stderr so the spread is visible, and
# the load average around each run is printed with its table. On a shared machine torch's OpenMP
# threads spin-wait and lose far more than lowrank's; OMP_WAIT_POLICY=PASSIVE (passed through to
# the reference) helped in one trial under load.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
DTYPE=${DTYPE:-f32} REPS=${REPS:-5} WARMUP=${WARMUP:-1} PROMPT=${PROMPT:-128} DECODE=${DECODE:-64} BATCH=${BATCH:-8} THREADS=${THREADS:-2}
source scripts/reference/env.sh
args=(--reps "$REPS" --warmup "$WARMUP" --prompt "$PROMPT" --decode "$DECODE" --batch "$BATCH" --threads "$THREADS")

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# The 1-minute load average, sampled every 10 s while each run lasts and printed with its table
# (mean and max): on a machine with other work the figures are not comparable.
watch_load() { while sleep 10; do cut -d' ' -f1 /proc/loadavg 2>/dev/null || true; done >"$tmp/load-$1.txt" & watcher=$!; }
stop_load() {
    kill "$watcher" 2>/dev/null || true
    wait "$watcher" 2>/dev/null || true
    awk -v n="$(nproc)" '{ s += $1; if ($1 > m) m = $1 } END { if (NR) printf "# load average during the run (%d cores): mean %.2f, max %.2f over %d samples\n", n, s / NR, m, NR; else print "# load average: no sample" }' "$tmp/load-$1.txt" >"$tmp/load-$1.line"
}

echo "== building (cargo bench --no-run)" >&2
cargo bench -p lowrank --bench generate --no-run >&2
echo "== lowrank" >&2
watch_load lowrank
cargo bench -p lowrank --bench generate -- "${args[@]}" --dtype "$DTYPE" >"$tmp/lowrank.txt"
stop_load lowrank

have_ref=0
if [[ -x "$REF_PYTHON" && -d "$REF_MODEL" ]]; then
    echo "== transformers + PEFT" >&2
    watch_load reference
    "$REF_PYTHON" scripts/bench/transformers_generate.py --model "$REF_MODEL" "${args[@]}" >"$tmp/reference.txt"
    stop_load reference
    have_ref=1
fi

have_llama=0
if [[ -x "$REF_PYTHON" && -f "$REF_GGUF" ]] && "$REF_PYTHON" -c 'import llama_cpp' 2>/dev/null; then
    echo "== llama.cpp" >&2
    watch_load llama
    "$REF_PYTHON" scripts/bench/llama_cpp_generate.py --model "$REF_GGUF" "${args[@]}" >"$tmp/llama.txt"
    stop_load llama
    have_llama=1
fi

echo
cat "$tmp/lowrank.txt"
cat "$tmp/load-lowrank.line"
echo
if [[ $have_llama == 1 ]]; then
    cat "$tmp/llama.txt"
    cat "$tmp/load-llama.line"
    echo
    awk '
        FNR == NR { if ($1 !~ /^#/ && $1 != "mode") { p = $3; d = $4; b = $5 } next }
        $1 ~ /^#/ || $1 == "mode" || $2 != "none" { next }
        !header++ {
            print "# lowrank / llama.cpp, no adapter (>1: lowrank faster)"
            printf "%-12s %14s %14s %20s\n", "mode", "prefill", "decode", "batch_decode"
        }
        { printf "%-12s %14.2f %14.2f %20s\n", $1, $3 / p, $4 / d, ($5 == "-" || b == "-") ? "-" : sprintf("%.2f", $5 / b) }
    ' "$tmp/llama.txt" "$tmp/lowrank.txt"
    echo
else
    echo "# no llama.cpp: the reference Python does not import llama_cpp (scripts/reference/setup.sh --with-llama-cpp)"
fi
if [[ $have_ref == 0 ]]; then
    echo "# no reference: $REF_PYTHON or $REF_MODEL is missing (run scripts/reference/setup.sh, or set LOWRANK_REFERENCE)"
    exit 0
fi
cat "$tmp/reference.txt"
cat "$tmp/load-reference.line"
echo
# Rows are `mode adapter prefill decode batch`; compare each lowrank row with the reference row
# of the same adapter.
awk -v batch="$BATCH" '
    FNR == NR { if ($1 !~ /^#/ && $1 != "mode") { p[$2] = $3; d[$2] = $4; b[$2] = $5 } next }
    $1 ~ /^#/ || $1 == "mode" || $2 ~ /^ratio/ { next }
    !header++ {
        print "# lowrank / transformers, same adapter (>1: lowrank faster)"
        printf "%-12s %-14s %14s %14s %20s\n", "mode", "adapter", "prefill", "decode", "batch" batch "_decode"
    }
    {
        r = ($5 == "-" || b[$2] == "-" || b[$2] == "") ? "-" : sprintf("%.2f", $5 / b[$2])
        printf "%-12s %-14s %14.2f %14.2f %20s\n", $1, $2, $3 / p[$2], $4 / d[$2], r
    }
' "$tmp/reference.txt" "$tmp/lowrank.txt"
