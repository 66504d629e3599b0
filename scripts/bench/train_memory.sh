#!/usr/bin/env bash
# Peak memory and speed of LoRA training per mode (issue 6): SmolLM2-135M, batch 4 x 256 random
# tokens, LoRA r16 alpha 32 on all seven projections, AdamW, median of STEPS-1 steps, 2 threads,
# each run in its own process (peak RSS = VmHWM of that process).
#
#   scripts/bench/train_memory.sh          # knobs: STEPS (default 5) THREADS (default 2)
#
# lowrank (crates/lowrank/benches/train.rs): the GGUF dequantised to f32, the GGUF's Q4_1 blocks,
# the reference stack's f32 HF directory quantised to NF4 at load — each without gradient checkpointing, with it on every
# block (+ckpt) and on every second block (+ckpt/2; the quantized modes) — and
# DoRA on the Q4_1 base. PEFT (scripts/bench/peft_train.py with the reference venv):
# f32, f32 with gradient checkpointing, DoRA. One table: tokens/s, peak RSS, both over PEFT f32,
# tokens/s over lowrank's own f32 mode, and resident weight bytes per parameter.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
STEPS=${STEPS:-5} THREADS=${THREADS:-2}
source scripts/reference/env.sh; require_reference
REF_SCRIPT=scripts/bench/peft_train.py

echo "== building (cargo bench --no-run)" >&2
cargo bench -p lowrank --bench train --no-run >&2
rows=$(mktemp)
trap 'rm -f "$rows"' EXIT
lowrank() {
    echo "== lowrank $*" >&2
    cargo bench -q -p lowrank --bench train -- --steps "$STEPS" --threads "$THREADS" "$@" 2>/dev/null \
        | awk '$1 !~ /^#/ && $1 != "mode" { print "lowrank", $1, $2, $4, $6 }' >>"$rows"
}
peft() {
    local label=$1; shift
    echo "== PEFT $label" >&2
    "$REF_PYTHON" "$REF_SCRIPT" "$REF_MODEL" --steps "$STEPS" --threads "$THREADS" "$@" 2>/dev/null | tail -1 \
        | awk -v l="$label" '{ for (i = 1; i < NF; i++) { if ($i == "tokens_per_s") t = $(i + 1); if ($i == "peak_rss_mib") r = $(i + 1) } print "PEFT", l, t, r, "4.000" }' >>"$rows"
}
lowrank --mode f32
lowrank --mode f32 --checkpoint 1
lowrank --mode q4_1
lowrank --mode q4_1 --checkpoint 1
lowrank --mode q4_1 --checkpoint 2
lowrank --mode nf4 --model "$REF_MODEL"
lowrank --mode nf4 --model "$REF_MODEL" --checkpoint 1
lowrank --mode nf4 --model "$REF_MODEL" --checkpoint 2
lowrank --mode q4_1 --dora 1
peft f32
peft f32+ckpt --ckpt
peft f32+dora --dora

awk '
    { tool[NR] = $1; mode[NR] = $2; tps[NR] = $3; rss[NR] = $4; bpp[NR] = $5
      if ($1 == "PEFT" && $2 == "f32") { pt = $3; pr = $4 }
      if ($1 == "lowrank" && $2 == "gguf-f32") { lt = $3 } }
    END {
        printf "| tool | mode | tokens/s | peak RSS MiB | RSS / PEFT f32 | tok/s / PEFT f32 | tok/s / lowrank f32 | weight bytes/param |\n|---|---|---:|---:|---:|---:|---:|---:|\n"
        for (i = 1; i <= NR; i++)
            printf "| %s | %s | %.1f | %.0f | %.2f | %.2f | %.2f | %s |\n", tool[i], mode[i], tps[i], rss[i], rss[i] / pr, tps[i] / pt, tps[i] / lt, bpp[i]
    }' "$rows"
echo "# 1-minute load average at the end: $(cut -d' ' -f1 /proc/loadavg)"
