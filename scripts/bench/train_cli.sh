#!/usr/bin/env bash
# LoRA training through the CLI a user runs: `lowrank train` on the default model (its f32 HF form,
# its Q4_1 GGUF, and with --dtype bf16 its HF form stored in bf16: the `hf16` rows), --dtype bf16
# and f32, beside PEFT + PyTorch f32 and bf16 autocast (scripts/bench/peft_train.py) in the same
# run. Batch 4 x 256 tokens with the loss on every token (text rows of ~400 words cut to
# --max-seq-len 256; PEFT: random ids), LoRA r 16 alpha 32 on q,k,v,o,gate,up,down, AdamW, 2
# threads.
#
#   scripts/bench/train_cli.sh                 # knobs: STEPS (default 8) ROUNDS (default 2)
#   SHAPE=short scripts/bench/train_cli.sh     # short rows: batch 8 of the roman example's
#       prompt/completion rows (~20 tokens, loss on the completion), PEFT on random rows of the
#       same mean length (loss on every token); default STEPS 30
#
# lowrank: tokens/s is the median of `metrics.jsonl`'s per-step tokens_per_s after the first step
# (the step itself: no evaluation, no checkpoint); peak RSS is /usr/bin/time's maximum resident
# set of the whole command (load, data, training, writing the adapter). PEFT: its script's median
# step and peak RSS. Each configuration runs ROUNDS times, alternating; the table shows medians
# over rounds and the largest peak. Build first: cargo build --release -p lowrank-cli.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
SHAPE=${SHAPE:-long} ROUNDS=${ROUNDS:-2}
case $SHAPE in
    long) STEPS=${STEPS:-8} BATCH=4 ;;
    short) STEPS=${STEPS:-30} BATCH=8 ;;
    *) echo "SHAPE is long or short" >&2; exit 1 ;;
esac
source scripts/reference/env.sh
require_reference
require_release_bin

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if [[ $SHAPE == short ]]; then
    cp examples/roman/train.jsonl "$tmp/rows.jsonl"
else
python3 - "$tmp/rows.jsonl" <<'PY'
import json, random, sys
rng = random.Random(2)
words = ("the quick brown fox jumps over lazy dog river mountain cloud seven apple orange table "
         "window light history of science music garden").split()
with open(sys.argv[1], "w") as f:
    for _ in range(200):
        f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(400))}) + "\n")
PY
fi
SEQ=256

run_lowrank() { # name dtype [--model DIR] (none: the default model's Q4_1 GGUF)
    local name=$1 dtype=$2 out="$tmp/run-$1-$2"
    shift 2
    rm -rf "$out"
    /usr/bin/time -f "%M" -o "$tmp/rss" "$BIN" train "$@" --data "$tmp/rows.jsonl" --output "$out" \
        --steps "$STEPS" --batch-size "$BATCH" --max-seq-len 256 --rank 16 --alpha 32 --dtype "$dtype" \
        --save-every 0 --eval-every 0 >/dev/null 2>"$tmp/err" || { cat "$tmp/err" >&2; exit 1; }
    # The rows' mean length, for PEFT's rows: "train: R rows (...), T tokens, ...".
    [[ $SHAPE == short ]] && SEQ=$(sed -n 's/^train: \([0-9]*\) rows ([A-Za-z]*), \([0-9]*\) tokens.*/\2 \1/p' "$tmp/err" | awk '{ printf "%d", $1 / $2 + 0.5 }')
    python3 - "$out/metrics.jsonl" "$(cat "$tmp/rss")" "$name-$dtype" >>"$tmp/rows.txt" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
tps = statistics.median(r["tokens_per_s"] for r in rows[1:])
print("lowrank", sys.argv[3], f"{tps:.1f}", f"{int(sys.argv[2]) / 1024:.0f}")
PY
}
run_peft() { # variant
    local flag=()
    [[ $1 == bf16 ]] && flag=(--bf16)
    "$REF_PYTHON" scripts/bench/peft_train.py "$REF_MODEL" --steps "$STEPS" --batch "$BATCH" --seq "$SEQ" --threads 2 "${flag[@]}" >"$tmp/peft.txt"
    awk -v v="$1" '$1 == "trainable" { for (i = 1; i < NF; i += 2) f[$i] = $(i + 1); print "peft", "hf-" v, f["tokens_per_s"], f["peak_rss_mib"] }' "$tmp/peft.txt" >>"$tmp/rows.txt"
}

for round in $(seq 1 "$ROUNDS"); do
    for dtype in bf16 f32; do
        echo "== round $round: lowrank train hf --dtype $dtype" >&2; run_lowrank hf "$dtype" --model "$REF_MODEL"
        if [[ $dtype == bf16 && -d $REF_MODEL_BF16 ]]; then
            echo "== round $round: lowrank train hf (stored in bf16) --dtype $dtype" >&2
            run_lowrank hf16 "$dtype" --model "$REF_MODEL_BF16"
        fi
        echo "== round $round: lowrank train q4_1 --dtype $dtype" >&2; run_lowrank q4_1 "$dtype"
    done
    for v in f32 bf16; do echo "== round $round: PEFT $v" >&2; run_peft "$v"; done
done

echo "# lowrank train (CLI) vs PEFT, SmolLM2-135M, $SHAPE rows (batch $BATCH; PEFT $BATCH x $SEQ), r16 all-linear, $STEPS steps, 2 threads, median over $ROUNDS rounds; $(date -u +%F) at $(git rev-parse --short HEAD)"
awk "$AWK_MEDIAN"'
    { key = $1 " " $2; if (!(key in seen)) { seen[key] = 1; order[++k] = key }
      tps[key] = tps[key] " " $3; runs[key] = runs[key] " " sprintf("%.0f", $3); if ($4 > rss[key]) rss[key] = $4 }
    END {
        pb = median(tps["peft hf-bf16"]); rb = rss["peft hf-bf16"]
        printf "%-8s %-10s %9s %9s %14s %14s  %s\n", "tool", "mode", "tokens/s", "peak_MiB", "tok/s_vs_bf16", "rss_vs_bf16", "each round"
        for (i = 1; i <= k; i++) { key = order[i]; split(key, kk, " "); t = median(tps[key])
            printf "%-8s %-10s %9.1f %9.0f %14.2f %14.2f %s\n", kk[1], kk[2], t, rss[key], t / pb, rss[key] / rb, runs[key] }
    }' "$tmp/rows.txt"
echo "# ratios: over PEFT bf16 autocast; load average now: $(cut -d' ' -f1-3 /proc/loadavg)"
