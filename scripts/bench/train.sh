#!/usr/bin/env bash
# LoRA training throughput and peak RSS of the default model (SmolLM2-135M-Instruct) on CPU:
# lowrank against PEFT + PyTorch. Batch 4 x 256 random tokens, loss on every token, LoRA r 16
# alpha 32 on q,k,v,o,gate,up,down, AdamW, median step time of 6 steps after the first.
#
#   scripts/bench/train.sh                              # from any directory
#   STEPS=8 THREADS=2 ROUNDS=3 scripts/bench/train.sh   # knobs: STEPS BATCH SEQ THREADS ROUNDS
#
# ROUNDS rounds (default 2) of four runs, one after another, each in its own process (peak RSS
# is per process); the table shows each configuration's median over the rounds (tokens/s, step
# time) and its largest peak RSS, so a burst of load on the shared machine hits every tool:
# 1. `cargo bench -p lowrank --bench train -- --mode q4_1` (crates/lowrank/benches/train.rs;
#    bench profile = release): the GGUF as loaded, quantised matmul;
# 2. the same with `--mode f32`: the GGUF dequantised to f32 at load;
# 3. the PEFT reference scripts/bench/peft_train.py with the reference stack's Python on its f32
#    HF form of the default model (scripts/reference/setup.sh; found through scripts/reference/env.sh);
# 4. the same with --bf16 (bf16 autocast).
# Then one table: tokens/s, median step seconds, peak RSS, and each row over PEFT f32.
#
# Takes about 5 minutes a round on two cores after the build. Timings are only as quiet as the machine:
# run it with nothing else busy (the 1-minute load average during each run is printed under the
# table); per-step seconds go to stderr.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
STEPS=${STEPS:-6} BATCH=${BATCH:-4} SEQ=${SEQ:-256} THREADS=${THREADS:-2} ROUNDS=${ROUNDS:-2}
source scripts/reference/env.sh
REF_SCRIPT=scripts/bench/peft_train.py

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# The 1-minute load average, sampled every 10 s while a run lasts (mean and max).
watch_load() { while sleep 10; do cut -d' ' -f1 /proc/loadavg 2>/dev/null || true; done >"$tmp/load-$1.txt" & watcher=$!; }
stop_load() {
    kill "$watcher" 2>/dev/null || true
    wait "$watcher" 2>/dev/null || true
    awk -v run="$1" '{ s += $1; if ($1 > m) m = $1 } END { if (NR) printf "#   %-12s mean %.2f, max %.2f over %d samples\n", run, s / NR, m, NR; else printf "#   %-12s no sample\n", run }' "$tmp/load-$1.txt" >>"$tmp/load.lines"
}

echo "== building (cargo bench --no-run)" >&2
cargo bench -p lowrank --bench train --no-run >&2

# Each run appends `tool mode tokens/s median_step_s peak_rss_mib` to rows.txt.
have_ref=0
[[ -x "$REF_PYTHON" && -d "$REF_MODEL" && -f "$REF_SCRIPT" ]] && have_ref=1
for round in $(seq 1 "$ROUNDS"); do
    for mode in q4_1 f32; do
        echo "== round $round: lowrank $mode" >&2
        watch_load "lowrank-$mode-$round"
        cargo bench -p lowrank --bench train -- --mode "$mode" --steps "$STEPS" --batch "$BATCH" --seq "$SEQ" --threads "$THREADS" >"$tmp/lowrank-$mode.txt"
        stop_load "lowrank-$mode-$round"
        awk '$1 !~ /^#/ && $1 != "mode" { print "lowrank", $1, $2, $3, $4 }' "$tmp/lowrank-$mode.txt" >>"$tmp/rows.txt"
    done
    [[ $have_ref == 1 ]] || continue
    for variant in f32 bf16; do
        flag=()
        [[ $variant == bf16 ]] && flag=(--bf16)
        echo "== round $round: PEFT $variant" >&2
        watch_load "peft-$variant-$round"
        "$REF_PYTHON" "$REF_SCRIPT" "$REF_MODEL" --steps "$STEPS" --batch "$BATCH" --seq "$SEQ" --threads "$THREADS" "${flag[@]}" | tee "$tmp/peft-$variant.txt" >&2
        stop_load "peft-$variant-$round"
        # Last line: `trainable N median_step_s S tokens_per_s X peak_rss_mib M`.
        awk -v v="$variant" '$1 == "trainable" { for (i = 1; i < NF; i += 2) f[$i] = $(i + 1); print "peft", "hf-" v, f["tokens_per_s"], f["median_step_s"], f["peak_rss_mib"] }' "$tmp/peft-$variant.txt" >>"$tmp/rows.txt"
    done
done

echo
echo "# LoRA training, SmolLM2-135M, batch $BATCH x $SEQ tokens, r 16 alpha 32 on 7 projections, AdamW; per run the median of $((STEPS - 1)) steps after 1 warm-up, $THREADS threads; median over $ROUNDS rounds"
echo "# ratio columns: this row / PEFT f32 (tokens/s >1: faster; RSS <1: smaller)"
awk "$AWK_MEDIAN"'
    {
        key = $1 " " $2
        if (!(key in seen)) { seen[key] = 1; order[++k] = key }
        tps[key] = tps[key] " " $3; med[key] = med[key] " " $4; runs[key] = runs[key] " " sprintf("%.0f", $3)
        if ($5 > rss[key]) rss[key] = $5
    }
    END {
        rt = ("peft hf-f32" in seen) ? median(tps["peft hf-f32"]) : 0; rr = rss["peft hf-f32"]
        printf "%-8s %-10s %10s %14s %13s %15s %13s  %s\n", "tool", "mode", "tokens/s", "median_step_s", "peak_rss_mib", "tok/s_vs_peft", "rss_vs_peft", "tokens/s of each round"
        for (i = 1; i <= k; i++) {
            key = order[i]; split(key, kk, " ")
            t = median(tps[key])
            a = rt ? sprintf("%.2f", t / rt) : "-"
            b = rr ? sprintf("%.2f", rss[key] / rr) : "-"
            printf "%-8s %-10s %10.1f %14.3f %13.0f %15s %13s %s\n", kk[1], kk[2], t, median(med[key]), rss[key], a, b, runs[key]
        }
    }
' "$tmp/rows.txt"
echo "# load average during each run ($(nproc) cores):"
cat "$tmp/load.lines"
if [[ $have_ref == 0 ]]; then
    echo "# no reference: $REF_PYTHON, $REF_MODEL or $REF_SCRIPT is missing (run scripts/reference/setup.sh, or set LOWRANK_REFERENCE)"
fi
