"""PyTorch's f32 and bf16 matmuls (oneDNN on the CPU) on the default model's frozen-weight shapes,
the reference for crates/lowrank/benches/matmul.rs: usage torch_matmul.py [--rows N] [--reps R]
[--threads T]. Prints `weight direction f32_gflops bf16_gflops` rows (median of R calls)."""
import argparse, time, torch

p = argparse.ArgumentParser()
p.add_argument("--rows", type=int, default=1024); p.add_argument("--reps", type=int, default=7)
p.add_argument("--threads", type=int, default=2)
a = p.parse_args()
torch.set_num_threads(a.threads)
n = a.rows
for name, m, k in [("q/o", 576, 576), ("k/v", 192, 576), ("gate/up", 1536, 576), ("down", 576, 1536)]:
    out = {}
    for dt in (torch.float32, torch.bfloat16):
        w, x, dy = torch.randn(m, k).to(dt), torch.randn(n, k).to(dt), torch.randn(n, m).to(dt)
        for direction, f in (("xWt", lambda: x @ w.t()), ("dyW", lambda: dy @ w)):
            f()
            ts = []
            for _ in range(a.reps):
                t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
            out[(direction, dt)] = 2 * n * m * k / sorted(ts)[len(ts) // 2] / 1e9
    for direction in ("xWt", "dyW"):
        print(f"{name} {direction} {out[(direction, torch.float32)]:.1f} {out[(direction, torch.bfloat16)]:.1f}")
