#!/usr/bin/env bash
# Does bf16 training learn what f32 training learns? The dates example task at its defaults
# (60 steps of 4, lr 1e-3 cosine, r16 all-linear) on the default model's f32 HF form, --dtype f32
# and --dtype bf16, over seeds; prints each run's held-out loss after the last step and held-out
# exact match, then the per-dtype mean and standard deviation.
#   scripts/bench/bf16_learning.sh            # SEEDS="0 1 2" by default; ~2 minutes a run
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
SEEDS=${SEEDS:-0 1 2}
source scripts/reference/env.sh
require_reference
require_release_bin
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "# dates example, $REF_MODEL, $(date -u +%F) at $(git rev-parse --short HEAD)"
echo "dtype seed heldout_loss exact_match"
for seed in $SEEDS; do
    for dtype in f32 bf16; do
        out="$tmp/$dtype-$seed"
        "$BIN" train --model "$REF_MODEL" --seed "$seed" --dtype "$dtype" --output "$out" >"$tmp/log" 2>&1 ||
            { cat "$tmp/log" >&2; exit 1; }
        loss=$(python3 -c "import json,sys; r=[json.loads(l) for l in open(sys.argv[1])]; print([x['eval_loss'] for x in r if x.get('eval_loss') is not None][-1])" "$out/metrics.jsonl")
        exact=$(sed -n 's/.*held-out exact match: before [0-9]*\/[0-9]* ([0-9]*%), after \([0-9]*\)\/.*/\1/p' "$tmp/log")
        echo "$dtype $seed $loss $exact"
    done
done | tee "$tmp/rows"
awk '{ n[$1]++; l[$1] += $3; ll[$1] += $3 * $3; e[$1] += $4 }
     END { for (d in n) { m = l[d] / n[d]; sd = sqrt(ll[d] / n[d] - m * m)
           printf "# %s: mean held-out loss %.4f (sd %.4f over %d seeds), mean exact match %.1f/100\n", d, m, sd, n[d], e[d] / n[d] } }' "$tmp/rows"
