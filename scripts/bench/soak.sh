#!/usr/bin/env bash
# A bounded, self-stopping soak of `lowrank serve` on loopback (scripts/bench/soak.py): GOOD
# well-behaved clients over 8 adapters and the base, BAD misbehaving ones, for SECONDS, then
# SIGTERM; prints errors, latency quartiles early and late, RSS and open-fd samples.
#   scripts/bench/soak.sh [SECONDS] [GOOD] [BAD]      # default 600 64 64
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
secs=${1:-600}; good=${2:-64}; bad=${3:-64}
cargo build -q --release -p lowrank-cli
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
# Eight adapters of rank 8 on q/v with seeded noise (changes the answers; realistic sizes).
python3 - "$work/adapters" <<'PY'
import json, os, random, struct, sys
root = sys.argv[1]
for i in range(8):
    d = os.path.join(root, f"a{i}")
    os.makedirs(d)
    json.dump({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "bias": "none"},
              open(os.path.join(d, "adapter_config.json"), "w"))
    rng = random.Random(i)
    tensors, blobs, off = {}, [], 0
    for l in range(30):
        for m, out in (("q_proj", 576), ("v_proj", 192)):
            for part, shape in (("lora_A", [8, 576]), ("lora_B", [out, 8])):
                n = shape[0] * shape[1]
                data = struct.pack(f"<{n}f", *(rng.uniform(-0.05, 0.05) for _ in range(n)))
                tensors[f"base_model.model.model.layers.{l}.self_attn.{m}.{part}.weight"] = {
                    "dtype": "F32", "shape": shape, "data_offsets": [off, off + len(data)]}
                blobs.append(data)
                off += len(data)
    header = json.dumps(tensors).encode()
    header += b" " * (-len(header) % 8)
    with open(os.path.join(d, "adapter_model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + b"".join(blobs))
PY
python3 scripts/bench/soak.py ./target/release/lowrank "$work/adapters" "$secs" "$good" "$bad"
