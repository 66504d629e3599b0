#!/usr/bin/env bash
# The frozen-weight products of a training step (batch 4 x 256 = 1024 rows, the default model's
# four weight shapes), lowrank f32 and bf16 (crates/lowrank/benches/matmul.rs) beside PyTorch's
# f32 and bf16 matmuls (oneDNN; scripts/bench/torch_matmul.py) in the same run, 2 threads, GFLOP/s.
#   scripts/bench/matmul.sh          # ROWS=256 scripts/bench/matmul.sh for the loss head's chunks
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
ROWS=${ROWS:-1024}
source scripts/reference/env.sh
require_reference
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cargo bench -p lowrank --bench matmul --no-run >&2
cargo bench -p lowrank --bench matmul -- --rows "$ROWS" >"$tmp/lowrank.txt"
"$REF_PYTHON" scripts/bench/torch_matmul.py --rows "$ROWS" >"$tmp/torch.txt"
echo "# $ROWS rows, 2 threads, GFLOP/s (median of 7 calls); $(date -u +%F) at $(git rev-parse --short HEAD); load $(cut -d' ' -f1 /proc/loadavg)"
printf "%-8s %-5s %-4s %9s %9s %10s %10s %12s\n" weight kind dir lowrank_f32 lowrank_bf16 torch_f32 torch_bf16 bf16_vs_torch
awk 'NR == FNR { t[$1 " " $2] = $3 " " $4; next }
     $1 !~ /^#/ && $1 != "weight" { split(t[$1 " " $3], r, " ")
        printf "%-8s %-5s %-4s %11.1f %12.1f %10.1f %10.1f %12.2f\n", $1, $2, $3, $4, $5, r[1], r[2], $5 / r[2] }' \
    "$tmp/torch.txt" "$tmp/lowrank.txt"
