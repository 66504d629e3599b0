#!/usr/bin/env bash
# Paired runs of two lowrank binaries, alternating, for a refactor's no-regression check:
# training tokens/s (median of steps 6-30 of a 30-step run on the dates data, batch 4, r16
# all-linear, 2 threads) and greedy decode tokens/s of `generate --verbose` (64 tokens).
#   scripts/bench/paired.sh OLD_BIN NEW_BIN [ROUNDS]      # build OLD_BIN from a git worktree
# Prints one line per run; take medians per binary.
set -euo pipefail
old=$1 new=$2 rounds=${3:-3}
data=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/examples/dates/train.jsonl
for r in $(seq "$rounds"); do
  for tool in old new; do
    bin=${!tool}
    out=$(mktemp -d)/run
    RAYON_NUM_THREADS=2 "$bin" train --data "$data" --output "$out" --steps 30 --save-every 1000 --eval-every 1000 >/dev/null 2>&1
    tps=$(python3 -c "
import json,statistics,sys
m=[json.loads(l) for l in open('$out/metrics.jsonl')][5:]
print(round(statistics.median(x['tokens_per_s'] for x in m),1))")
    dec=$(RAYON_NUM_THREADS=2 "$bin" generate --verbose --chat "Write a short story about a robot who learns to paint." --max-new-tokens 64 2>&1 >/dev/null | grep -o "decode[^,]*" | head -1)
    echo "round $r $tool train_tok_s $tps | $dec"
  done
done
