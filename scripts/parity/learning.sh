#!/usr/bin/env bash
# Learning parity on a shipped example task (EXAMPLE=dates, the default: examples/dates/, 400
# training conversations, 100 held out; EXAMPLE=roman: examples/roman/, 800 prompt/completion rows
# whose prompts end in whitespace, 100 held out): `lowrank train` against PEFT + transformers with
# the same hyper-parameters, tokenization and seeds. Held-out loss and exact-match accuracy should
# end within seed-to-seed noise of PEFT's.
#
#   scripts/parity/learning.sh                          # from any directory; seeds 0 and 1
#   SEEDS="0 1 2" EXAMPLE=roman scripts/parity/learning.sh
#   SEEDS="0 1 2" ORDER=lowrank scripts/parity/learning.sh
#   LOWRANK_ARGS="--model $HOME/.cache/lowrank-reference/smollm2-hf --quantize nf4" scripts/parity/learning.sh
#   SEEDS="1 2" ROWS=old/rows.txt scripts/parity/learning.sh   # more seeds, tabled with earlier rows
#                                  # QLoRA on both sides: lowrank's NF4 against bitsandbytes' NF4
#   knobs: EXAMPLE SEEDS THREADS ORDER LOWRANK_ARGS OUT ROWS
#
# Per seed, one after another, each in its own process:
# 1. `lowrank train --example $EXAMPLE --output OUT/lowrank-sS --seed S $LOWRANK_ARGS` (the
#    release binary, built once and copied to OUT, so every seed runs the same build): the example defaults (default model, SmolLM2-135M-Instruct Q4_1 GGUF as loaded;
#    lr 1e-3, 10 warm-up steps, cosine, LoRA r 16 alpha 32 on all linear layers, AdamW, clip 1.0;
#    dates: 60 steps of batch 4, loss on the assistant's answer and its <|im_end|>; roman: 150
#    steps of batch 8, loss on the numeral and the eos after the prompt's own tokens); it prints
#    exact match before and after and writes metrics.jsonl;
# 2. scripts/parity/learning_peft.py with the reference stack's Python on its f32 HF form of the
#    default model (scripts/reference/setup.sh; scripts/reference/env.sh finds them), taking its
#    hyper-parameters, data files and seed from the lowrank run's lowrank_train.json; the script's docstring lists what
#    it mirrors (target tokens, loss averaging, schedule, exact-match scoring).
# Then one table: final train loss (last step, and mean of the last 10 steps, since one batch
# is noisy), held-out loss after the last step (mean over every eval target token, the same
# definition on both sides), held-out exact match, wall seconds of each run.
#
# What differs by construction: the adapter's random init (rand's StdRng vs torch), the data
# order unless ORDER=lowrank (PEFT side shuffles with its own seeded RNG by default; ORDER=lowrank
# reproduces lowrank's SplitMix64 permutation exactly), and the base weights' arithmetic (lowrank
# runs the Q4_1 matmul unless LOWRANK_ARGS=--dequantize; PEFT runs f32 on the dequantised weights).
# Seed-to-seed spread within one tool is the noise the comparison is judged against.
#
# Takes about 10-15 minutes per seed on two cores after the build (lowrank ~4-6 min, PEFT ~5-8 min,
# each including 100 greedy answers). THREADS (default 2) sets RAYON_NUM_THREADS and torch's threads.
# Runs are kept in OUT (default: a fresh temp directory, printed at the end).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
EXAMPLE=${EXAMPLE:-dates} SEEDS=${SEEDS:-0 1} THREADS=${THREADS:-2} ORDER=${ORDER:-own} LOWRANK_ARGS=${LOWRANK_ARGS:-}
source scripts/reference/env.sh
require_reference
OUT=${OUT:-$(mktemp -d -t lowrank-parity.XXXXXX)}
mkdir -p "$OUT"
# torch's OpenMP threads spin-wait by default, which collapses on a busy two-core machine.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

echo "== building (cargo build --release -p lowrank-cli)" >&2
cargo build --release -p lowrank-cli >&2
cp target/release/lowrank "$OUT/lowrank"

# Each run appends `tool seed last_loss last10_loss eval_loss exact total seconds` to rows.txt.
rows=$OUT/rows.txt
if [[ -n ${ROWS:-} ]]; then cp "$ROWS" "$rows"; else : >"$rows"; fi
summary() { # metrics.jsonl exact total seconds → "last_loss last10_loss eval_loss exact total seconds"
    "$REF_PYTHON" - "$@" <<'EOF'
import json, sys
m = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
last10 = [x["loss"] for x in m[-10:]]
print(f'{m[-1]["loss"]:.4f} {sum(last10) / len(last10):.4f} {m[-1]["eval_loss"]:.4f} {sys.argv[2]} {sys.argv[3]} {sys.argv[4]}')
EOF
}
for seed in $SEEDS; do
    dir=$OUT/lowrank-s$seed
    echo "== lowrank seed $seed -> $dir" >&2
    start=$SECONDS
    # shellcheck disable=SC2086 # LOWRANK_ARGS is a list of flags
    RAYON_NUM_THREADS=$THREADS "$OUT/lowrank" train --example "$EXAMPLE" --output "$dir" --seed "$seed" $LOWRANK_ARGS \
        >"$OUT/lowrank-s$seed.out" 2>"$OUT/lowrank-s$seed.err" || { tail -20 "$OUT/lowrank-s$seed.err" >&2; exit 1; }
    secs=$((SECONDS - start))
    cat "$OUT/lowrank-s$seed.out" >&2
    # `held-out exact match: before 0/100 (0%), after 100/100 (100%)`
    after=$(sed -n 's/^held-out exact match: .*after \([0-9]*\)\/\([0-9]*\).*/\1 \2/p' "$OUT/lowrank-s$seed.out")
    [[ -n $after ]] || { echo "no exact-match line in $OUT/lowrank-s$seed.out" >&2; exit 1; }
    echo "lowrank $seed $(summary "$dir/metrics.jsonl" $after $secs)" >>"$rows"
    grep -E '^(train|eval): ' "$OUT/lowrank-s$seed.err" | sed 's/^/#   lowrank /' >"$OUT/targets-lowrank.txt"

    pdir=$OUT/peft-s$seed
    echo "== PEFT seed $seed -> $pdir" >&2
    start=$SECONDS
    "$REF_PYTHON" scripts/parity/learning_peft.py "$REF_MODEL" --out "$pdir" --settings "$dir/lowrank_train.json" \
        --threads "$THREADS" --order "$ORDER" 2>"$OUT/peft-s$seed.err" | tee "$OUT/peft-s$seed.out" >&2 \
        || { tail -20 "$OUT/peft-s$seed.err" >&2; exit 1; }
    secs=$((SECONDS - start))
    # `result final_loss X eval_loss Y exact C total N train_s T eval_s E`
    read -r exact total < <(awk '$1 == "result" { print $7, $9 }' "$OUT/peft-s$seed.out")
    echo "peft $seed $(summary "$pdir/metrics.jsonl" "$exact" "$total" $secs)" >>"$rows"
    grep -E '^(train|eval): ' "$OUT/peft-s$seed.out" | sed 's/^/#   peft    /' >"$OUT/targets-peft.txt"
done

echo
echo "# Example task examples/$EXAMPLE, LoRA r 16 alpha 32 all-linear, example defaults of lowrank train; PEFT data order: $ORDER; $THREADS threads"
echo "# final train loss: last step's batch, and the mean of the last 10 steps; held-out loss: mean over every eval target token after the last step"
awk '
    BEGIN { printf "%-8s %5s %10s %13s %12s %12s %8s\n", "tool", "seed", "train_loss", "train_last10", "heldout_loss", "exact_match", "wall_s" }
    { printf "%-8s %5s %10.4f %13.4f %12.4f %12s %8d\n", $1, $2, $3, $4, $5, $6 "/" $7, $8
      n[$1]++; e[$1] += $5; x[$1] += $6; t[$1] = $7 }
    END { for (k in n) printf "# %-7s mean over %d seeds: held-out loss %.4f, exact match %.1f/%d\n", k, n[k], e[k] / n[k], x[k] / n[k], t[k] }
' "$rows"
echo "# loss targets on each side (should be equal):"
cat "$OUT/targets-lowrank.txt" "$OUT/targets-peft.txt"
echo "# runs, metrics.jsonl and logs in $OUT"
