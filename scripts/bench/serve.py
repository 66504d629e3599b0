"""Load test and throughput of `lowrank serve` on the default model (scripts/bench/serve.sh).

    PY scripts/bench/serve.py LOWRANK_BIN GGUF [--clients 64] [--requests 256] [--max-tokens 32] [--dtype f32|bf16]

Writes 8 random q/v LoRA adapters (rank 8, numpy + safetensors), starts `lowrank serve` on a free
loopback port with them in --adapters-dir, then:
  1. load: CLIENTS concurrent clients send REQUESTS chat requests round-robin over the 8 adapters;
     every request must succeed; prints requests/s, generated tokens/s, p50/p99 latency;
  2. mixed vs single: 16 concurrent clients, 64 requests, all on one adapter, then spread over 8:
     aggregate generated tokens/s of each and the ratio;
  3. single stream: one streamed request of 128 tokens on the base model, decode tokens/s after
     the first token; the same with llama-cpp-python on the GGUF when it is installed.
Greedy; prompts are the held-out questions of examples/dates/eval.jsonl.
"""
import argparse, http.client, json, os, socket, statistics, subprocess, sys, tempfile, threading, time
import numpy as np
from safetensors.numpy import save_file

ap = argparse.ArgumentParser()
ap.add_argument("lowrank"); ap.add_argument("gguf")
ap.add_argument("--clients", type=int, default=64); ap.add_argument("--requests", type=int, default=256)
ap.add_argument("--max-tokens", type=int, default=32)
ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32", help="lowrank serve --dtype (prefill and batches over 16 rows)")
args = ap.parse_args()

questions = [json.loads(l)["messages"][0]["content"] for l in open("examples/dates/eval.jsonl") if l.strip()]
work = tempfile.mkdtemp()
adir = os.path.join(work, "adapters")
rng = np.random.default_rng(0)
for i in range(8):
    d = os.path.join(adir, f"a{i}"); os.makedirs(d)
    json.dump({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}, open(os.path.join(d, "adapter_config.json"), "w"))
    t = {}
    for l in range(30):
        for m, out in (("q_proj", 576), ("v_proj", 192)):
            p = f"base_model.model.model.layers.{l}.self_attn.{m}"
            t[f"{p}.lora_A.weight"] = (rng.standard_normal((8, 576)) * 0.02).astype(np.float32)
            t[f"{p}.lora_B.weight"] = (rng.standard_normal((out, 8)) * 0.02).astype(np.float32)
    save_file(t, os.path.join(d, "adapter_model.safetensors"))

with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
server = subprocess.Popen([args.lowrank, "serve", "--model", args.gguf, "--port", str(port), "--adapters-dir", adir,
                           "--max-batch", "32", "--max-queue", "1024", "--dtype", args.dtype], stderr=subprocess.DEVNULL)
# The port opens at once; /health answers 503 ("loading") until the model is in.
for _ in range(600):
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=2); c.request("GET", "/health")
        if c.getresponse().status == 200: break
    except OSError: pass
    time.sleep(0.2)
else:
    server.terminate(); sys.exit("lowrank serve did not become ready in 120 s")

def chat(model, q, max_tokens, stream=False):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = {"model": model, "messages": [{"role": "user", "content": q}], "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    t0 = time.perf_counter()
    c.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = c.getresponse()
    if not stream:
        data = json.loads(r.read())
        if r.status != 200:
            return f"{r.status} {data.get('error', {}).get('message', '')[:120]}", 0, time.perf_counter() - t0, None
        return r.status, data.get("usage", {}).get("completion_tokens", 0), time.perf_counter() - t0, None
    first, n = None, 0
    for line in r:
        line = line.strip()
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            d = json.loads(line[6:])
            if d["choices"] and d["choices"][0]["delta"].get("content"):
                n += 1
                if first is None: first = time.perf_counter()
    return r.status, n, time.perf_counter() - t0, time.perf_counter() - first

def run(n_clients, jobs):
    lat, toks, errors, lock = [], [0], [], threading.Lock()
    it = iter(jobs)
    def worker():
        while True:
            with lock:
                job = next(it, None)
            if job is None: return
            try:
                status, n, secs, _ = chat(*job)
            except Exception as e:
                status, n, secs = repr(e), 0, 0
            with lock:
                if status != 200: errors.append(status)
                lat.append(secs); toks[0] += n
    t0 = time.perf_counter()
    ts = [threading.Thread(target=worker) for _ in range(n_clients)]
    [t.start() for t in ts]; [t.join() for t in ts]
    wall = time.perf_counter() - t0
    lat.sort()
    if errors:
        print(f"  {len(errors)} failed requests, e.g. {sorted(set(map(str, errors)))[:3]}", file=sys.stderr)
    return {"requests": len(lat), "errors": len(errors), "wall_s": wall, "req_per_s": len(lat) / wall, "gen_tok_per_s": toks[0] / wall,
            "p50_s": lat[len(lat) // 2], "p99_s": lat[min(len(lat) - 1, int(len(lat) * 0.99))]}

try:
    chat("a0", "warm up", 4)
    jobs = [(f"a{i % 8}", questions[i % len(questions)], args.max_tokens) for i in range(args.requests)]
    load = run(args.clients, jobs)
    print(f"load: {args.clients} clients, {load['requests']} requests over 8 adapters, {load['errors']} errors: "
          f"{load['req_per_s']:.2f} req/s, {load['gen_tok_per_s']:.1f} generated tok/s, p50 {load['p50_s']:.2f} s, p99 {load['p99_s']:.2f} s")
    one = run(16, [("a0", questions[i % len(questions)], args.max_tokens) for i in range(64)])
    eight = run(16, [(f"a{i % 8}", questions[i % len(questions)], args.max_tokens) for i in range(64)])
    print(f"throughput, 16 clients x 64 requests: 1 adapter {one['gen_tok_per_s']:.1f} tok/s, 8 adapters {eight['gen_tok_per_s']:.1f} tok/s "
          f"(ratio {eight['gen_tok_per_s'] / one['gen_tok_per_s']:.2f}; errors {one['errors'] + eight['errors']})")
    model = os.path.splitext(os.path.basename(args.gguf))[0]
    rates = []
    for _ in range(3):
        status, n, secs, after_first = chat(model, "Write a long story about a dragon.", 128, stream=True)
        rates.append((n - 1) / after_first)
    print(f"single stream decode (lowrank serve, streamed, {n} tokens): {statistics.median(rates):.1f} tok/s")
finally:
    server.terminate(); server.wait()

try:
    from llama_cpp import Llama
    llm = Llama(model_path=args.gguf, n_ctx=512, n_threads=2, verbose=False)
    rates = []
    for _ in range(3):
        first, n = None, 0
        for ch in llm.create_chat_completion(messages=[{"role": "user", "content": "Write a long story about a dragon."}], max_tokens=128, temperature=0, stream=True):
            if ch["choices"][0]["delta"].get("content"):
                n += 1
                if first is None: first = time.perf_counter()
        rates.append((n - 1) / (time.perf_counter() - first))
    print(f"single stream decode (llama-cpp-python, same GGUF, {n} tokens): {statistics.median(rates):.1f} tok/s")
except ImportError:
    print("llama-cpp-python not installed: no llama.cpp figure")
