"""llama.cpp beside crates/lowrank/benches/generate.rs: prefill and greedy decode tokens/s of the
default model's Q4_1 GGUF through llama-cpp-python's low-level API (CPU), and batch decode of
`batch` sequences in one `llama_decode` per step. No adapter (the `none` rows).

    $REF_PYTHON scripts/bench/llama_cpp_generate.py --model SmolLM2-135M-Instruct.Q4_1.gguf \
        [--reps 5] [--warmup 1] [--prompt 128] [--decode 64] [--batch 8] [--threads 2]

Same procedure as the Rust bench and transformers_generate.py: one repetition is one decode of the
prompt (prefill; logits of the last position only), then `decode` single-token steps each feeding
back the argmax (EOS ignored), the cache cleared between repetitions. Batch decode: `batch`
prompts (the bench's prompts, one sequence id each) prefilled untimed, then `decode` steps of
`batch` tokens. Medians over `reps` after `warmup`; each repetition's seconds go to stderr, the
table (the bench's format) to stdout.
"""

import argparse
import statistics
import sys
import time

import llama_cpp as L
import numpy as np

MODE = "llama.cpp"
PROMPT_VOCAB = 49152


def prompt_ids(seq, length):
    """The bench's prompt of sequence `seq` (same formula as `prompt_ids` in generate.rs)."""
    return [(1000 + 7919 * i + 104729 * seq) % PROMPT_VOCAB for i in range(length)]


@L.llama_log_callback
def _quiet(level, text, user_data):
    """llama.cpp's load and context logs: dropped (the table and the seconds are what count)."""


class Runner:
    def __init__(self, path, threads, n_ctx, n_batch, n_seq):
        L.llama_log_set(_quiet, None)
        L.llama_backend_init()
        self.model = L.llama_model_load_from_file(path.encode(), L.llama_model_default_params())
        if not self.model:
            sys.exit(f"llama.cpp could not load {path}")
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx, n_batch, n_batch, n_seq
        cp.n_threads = cp.n_threads_batch = threads
        self.ctx = L.llama_init_from_model(self.model, cp)
        self.vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.batch = L.llama_batch_init(n_batch, 0, n_seq)

    def clear(self):
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)

    def decode(self, items):
        """items: (token, position, sequence, wants logits); returns the argmax of each row that
        wants logits, in order."""
        b = self.batch
        b.n_tokens = len(items)
        for i, (tok, pos, seq, logits) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, logits
            b.seq_id[i][0] = seq
        if L.llama_decode(self.ctx, b) != 0:
            sys.exit("llama_decode failed")
        return [
            int(np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, i), shape=(self.vocab,)).argmax())
            for i, it in enumerate(items)
            if it[3]
        ]

    def single(self, prompt, decode):
        self.clear()
        t0 = time.perf_counter()
        (nxt,) = self.decode([(t, i, 0, i == len(prompt) - 1) for i, t in enumerate(prompt)])
        prefill = time.perf_counter() - t0
        t1 = time.perf_counter()
        for step in range(decode):
            (nxt,) = self.decode([(nxt, len(prompt) + step, 0, True)])
        return prefill, time.perf_counter() - t1

    def batched(self, prompts, decode):
        self.clear()
        nxt = []
        for s, prompt in enumerate(prompts):
            nxt += self.decode([(t, i, s, i == len(prompt) - 1) for i, t in enumerate(prompt)])
        t0 = time.perf_counter()
        for step in range(decode):
            nxt = self.decode([(t, len(prompts[s]) + step, s, True) for s, t in enumerate(nxt)])
        return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="the default model's Q4_1 GGUF")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8, help="sequences decoded together (0: skip)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    seqs = max(args.batch, 1)
    run = Runner(args.model, args.threads, seqs * (args.prompt + args.decode + 8), max(args.prompt, seqs), seqs)
    prompt = prompt_ids(0, args.prompt)
    pre, dec, bat = [], [], []
    for rep in range(args.warmup + args.reps):
        p, d = run.single(prompt, args.decode)
        b = run.batched([prompt_ids(s, args.prompt) for s in range(args.batch)], args.decode) if args.batch else None
        tag = "warm-up" if rep < args.warmup else "rep"
        print(f"  {tag}: prefill s {p:.3f}  decode s {d:.3f}  batch s {b if b is None else round(b, 3)}", file=sys.stderr)
        if rep >= args.warmup:
            pre.append(p), dec.append(d), bat.append(b)
    p_tps = args.prompt / statistics.median(pre)
    d_tps = args.decode / statistics.median(dec)
    b_tps = f"{args.batch * args.decode / statistics.median(bat):.2f}" if args.batch else "-"
    print(
        f"# llama-cpp-python {L.__version__} (CPU, {args.model.rsplit('/', 1)[-1]}): prompt {args.prompt} tokens, "
        f"decode {args.decode} tokens (greedy, EOS ignored), median of {args.reps} after {args.warmup} warm-up, "
        f"{args.threads} threads"
    )
    print(f"{'mode':<12} {'adapter':<14} {'prefill_tok/s':>14} {'decode_tok/s':>14} {f'batch{args.batch}_decode_tok/s':>20}")
    print(f"{MODE:<12} {'none':<14} {p_tps:>14.1f} {d_tps:>14.2f} {b_tps:>20}")


if __name__ == "__main__":
    main()
