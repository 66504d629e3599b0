"""A soak of `lowrank serve` on loopback: well-behaved clients over several adapters beside
misbehaving ones, for a fixed time, then SIGTERM. Standard library only.

    python3 scripts/bench/soak.py LOWRANK_BINARY ADAPTERS_DIR SECONDS [GOOD] [BAD]

GOOD clients (default 64) loop: a short chat completion (8 tokens, greedy) for the base or one of
the adapters in ADAPTERS_DIR, checking the status and the answer's shape. BAD clients (default
64) loop over misbehaviours: partial headers then silence, a half-sent body, an oversized
`max_tokens`, a 1 MB unknown model name, a request abandoned mid-stream, a connection opened and
dropped. Every 10 s the server's RSS and open file descriptors are sampled. At the end: errors
of the good clients, their latency quartiles in the first and the last third of the run, RSS and
fd samples, and how long SIGTERM took. Exit status 1 on any good-client error, RSS growth over
25%, fd growth over 32, or a shutdown over 40 s.
"""
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

binary, adapters_dir, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
good_n = int(sys.argv[4]) if len(sys.argv) > 4 else 64
bad_n = int(sys.argv[5]) if len(sys.argv) > 5 else 64
adapters = sorted(os.listdir(adapters_dir))

server = subprocess.Popen(
    [binary, "serve", "--port", "0", "--adapters-dir", adapters_dir, "--max-batch", "16", "--header-timeout", "5",
     "--request-timeout", "300", "--max-connections", "400"],
    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
addr = None
for line in server.stderr:
    if "on http://" in line:
        addr = line.split("on http://")[1].strip().removesuffix("/v1")
        break
threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()
host, port = addr.split(":")
port = int(port)


def request(method, path, body=b"", timeout=300):
    s = socket.create_connection((host, port), timeout=timeout)
    s.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), rest


while True:
    try:
        if request("GET", "/health")[0] == 200:
            break
    except OSError:
        pass
    time.sleep(0.2)

started = time.time()
deadline = started + seconds
lock = threading.Lock()
latencies, errors, done = [], [], [0]
QUESTIONS = ["What is 2 + 2?", "Name a colour.", "Say hello.", "What is the capital of France?"]


def good(i):
    rng = random.Random(i)
    models = ["SmolLM2-135M-Instruct.Q4_1"] + adapters
    while time.time() < deadline:
        body = json.dumps({"model": rng.choice(models), "max_tokens": 8, "temperature": 0,
                           "messages": [{"role": "user", "content": rng.choice(QUESTIONS)}]}).encode()
        t = time.time()
        try:
            status, rest = request("POST", "/v1/chat/completions", body)
            ok = status == 200 and "choices" in json.loads(rest)
        except (OSError, ValueError) as e:
            ok, status = False, repr(e)
        with lock:
            if ok:
                latencies.append((t - started, time.time() - t))
                done[0] += 1
            else:
                errors.append(status)


def bad(i):
    rng = random.Random(1000 + i)
    while time.time() < deadline:
        kind = rng.randrange(6)
        try:
            s = socket.create_connection((host, port), timeout=20)
            if kind == 0:  # partial headers, then silence until the server gives up
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le")
                s.recv(1024)
            elif kind == 1:  # a half-sent body
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{\"model\":")
                s.recv(1024)
            elif kind == 2:  # an oversized max_tokens
                b = json.dumps({"model": "x", "prompt": "hi", "max_tokens": 2**64 - 1}).encode()
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(b) + b)
                s.recv(65536)
            elif kind == 3:  # a 1 MB unknown model name
                b = json.dumps({"model": "m" * 1_000_000, "prompt": "hi"}).encode()
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(b) + b)
                s.recv(65536)
            elif kind == 4:  # a stream abandoned after its first bytes
                b = json.dumps({"model": "SmolLM2-135M-Instruct.Q4_1", "prompt": "Once upon a time", "max_tokens": 64,
                                "stream": True}).encode()
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(b) + b)
                s.recv(256)
            # kind 5: opened and dropped at once
            s.close()
        except OSError:
            pass
        time.sleep(rng.uniform(0, 0.2))


def sample():
    fds = len(os.listdir(f"/proc/{server.pid}/fd"))
    with open(f"/proc/{server.pid}/status") as f:
        rss = next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 1024
    return round(time.time() - started), round(rss), fds


threads = [threading.Thread(target=good, args=(i,)) for i in range(good_n)]
threads += [threading.Thread(target=bad, args=(i,)) for i in range(bad_n)]
for t in threads:
    t.start()
samples = [sample()]
while time.time() < deadline:
    time.sleep(min(10, max(0.1, deadline - time.time())))
    samples.append(sample())
for t in threads:
    t.join()
samples.append(sample())
t = time.time()
server.send_signal(signal.SIGTERM)
code = server.wait(timeout=120)
shutdown = time.time() - t


def quartiles(xs):
    xs = sorted(xs)
    return [round(xs[int(q * (len(xs) - 1))], 2) for q in (0.25, 0.5, 0.75)] if xs else []


third = seconds / 3
first = [l for s, l in latencies if s < third]
last = [l for s, l in latencies if s >= 2 * third]
rss0, rss1 = samples[1][1], samples[-1][1]
fd0, fd1 = samples[1][2], samples[-1][2]
print(json.dumps({"seconds": seconds, "good_clients": good_n, "bad_clients": bad_n, "adapters": len(adapters),
                  "good_requests": done[0], "good_errors": len(errors), "error_kinds": sorted(set(map(str, errors)))[:5],
                  "latency_q1_median_q3_first_third_s": quartiles(first),
                  "latency_q1_median_q3_last_third_s": quartiles(last),
                  "rss_mib_fds_samples": " ".join(f"{s}s:{r}MiB/{f}fd" for s, r, f in samples),
                  "sigterm_exit": code, "shutdown_s": round(shutdown, 2)}, indent=1))
bad_run = errors or rss1 > 1.25 * rss0 or fd1 > fd0 + 32 or shutdown > 40 or code != 0
sys.exit(1 if bad_run else 0)
