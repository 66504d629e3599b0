"""Reference for crates/lowrank/benches/generate.rs: prefill and greedy decode tokens/s of
SmolLM2-135M-Instruct in transformers (f32, CPU), without an adapter and with a PEFT LoRA
(r=16, alpha=32, all-linear, init_lora_weights=False so B is non-zero).

    scripts/reference/python scripts/bench/transformers_generate.py \
        [--model $LOWRANK_REFERENCE/smollm2-hf] [--reps 5] [--threads 2] ...

The HF directory holds exactly the dequantised GGUF weights, so this is the same model as the
bench's `gguf-f32` mode. Same procedure as the Rust bench: one repetition is one forward over the
prompt with the cache on (prefill; logits of the last position only, as `generate()` asks for),
then `decode` single-token forwards with `past_key_values`, each feeding back the argmax (EOS
ignored). Batch decode: `batch` prompts of equal length as one `[B, T]` batch (no padding),
prefilled untimed, then `decode` steps of `[B, 1]`. Medians over `reps` after `warmup`; without
and with the adapter alternate repetition by repetition. The table
(stdout) has the bench's format; each repetition's seconds go to stderr.
"""

import argparse
import copy
import os
import statistics
import sys
import time

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

LORA_LABEL = "lora-r16-all"
PROMPT_VOCAB = 49152
MODE = "torch-f32"


def prompt_ids(seq, length):
    """The bench's prompt of sequence `seq` (same formula as `prompt_ids` in generate.rs)."""
    return [(1000 + 7919 * i + 104729 * seq) % PROMPT_VOCAB for i in range(length)]


def run_single(model, prompt, decode):
    """One repetition for one sequence: (prefill seconds, decode seconds)."""
    ids = torch.tensor([prompt])  # [1, T]
    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)  # logits [1, 1, V]
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]
    prefill = time.perf_counter() - t0
    cache = out.cache
    t1 = time.perf_counter()
    for _ in range(decode):
        out = model(input_ids=nxt, cache=cache, use_cache=True)  # logits [1, 1, V]
        cache = out.cache
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    return prefill, time.perf_counter() - t1


def run_batch(model, prompts, decode):
    """One repetition of batch decode: seconds for `decode` steps of `len(prompts)` sequences."""
    ids = torch.tensor(prompts)  # [B, T]
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)  # logits [B, 1, V]
    cache = out.cache
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
    t0 = time.perf_counter()
    for _ in range(decode):
        out = model(input_ids=nxt, cache=cache, use_cache=True)  # logits [B, 1, V]
        cache = out.cache
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    return time.perf_counter() - t0


def fmt_secs(xs):
    return " ".join(f"{x:.3f}" for x in xs)


def measure(args, variants):
    """Warm-up, then `reps` timed repetitions for each (label, model); returns per variant
    (prefill, decode, batch decode) tok/s. The variants alternate within each repetition, so a
    change in machine load during the run hits them alike and their ratio stays fair."""
    prompt = prompt_ids(0, args.prompt)
    pre, dec, bd = ([[] for _ in variants] for _ in range(3))
    for i in range(args.warmup + args.reps):
        for v, (_, model) in enumerate(variants):
            p, d = run_single(model, prompt, args.decode)
            if i >= args.warmup:
                pre[v].append(p)
                dec[v].append(d)
    prompts = [prompt_ids(b, args.prompt) for b in range(args.batch)]
    for i in range(args.warmup + args.reps if args.batch > 0 else 0):
        for v, (_, model) in enumerate(variants):
            t = run_batch(model, prompts, args.decode)
            if i >= args.warmup:
                bd[v].append(t)
    rows = []
    for v, (label, _) in enumerate(variants):
        print(f"  {label}: prefill s [{fmt_secs(pre[v])}]  decode s [{fmt_secs(dec[v])}]", file=sys.stderr)
        batch = None
        if args.batch > 0:
            print(f"  {label}: batch-{args.batch} decode s [{fmt_secs(bd[v])}]", file=sys.stderr)
            batch = args.batch * args.decode / statistics.median(bd[v])
        rows.append((args.prompt / statistics.median(pre[v]), args.decode / statistics.median(dec[v]), batch))
    return rows


def fmt_opt(x, digits):
    return "-" if x is None else f"{x:.{digits}f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=os.path.join(os.environ.get("LOWRANK_REFERENCE", os.path.expanduser("~/.cache/lowrank-reference")), "smollm2-hf"))
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed repetitions first")
    ap.add_argument("--prompt", type=int, default=128, help="prompt length")
    ap.add_argument("--decode", type=int, default=64, help="decoded tokens per repetition")
    ap.add_argument("--batch", type=int, default=8, help="sequences decoded together (0: skip)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    attn = base.config._attn_implementation
    # PEFT wraps its model in place, so the adapted model is a copy; the plain one stays plain.
    # init_lora_weights=False draws B at random too, so the update is really computed.
    cfg = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    lora_model = get_peft_model(copy.deepcopy(base), cfg).eval()
    n_lora = sum(1 for n, _ in lora_model.named_modules() if n.endswith(".lora_A"))
    with torch.inference_mode():
        probe = torch.tensor([prompt_ids(0, 8)])
        diff = (lora_model(input_ids=probe).logits - base(input_ids=probe).logits).abs().max().item()
        assert diff > 0, "the adapter does not change the logits"
        print(f"{MODE}: {args.model}; {n_lora} LoRA modules; adapter changes logits by up to {diff:.3f}", file=sys.stderr)
        none, lora = measure(args, [("none", base), (LORA_LABEL, lora_model)])

    print(
        f"# transformers {transformers.__version__} + peft {peft.__version__}, torch {torch.__version__} "
        f"(CPU, f32, attn {attn}): prompt {args.prompt} tokens, decode {args.decode} tokens "
        f"(greedy, EOS ignored), median of {args.reps} after {args.warmup} warm-up, {args.threads} threads"
    )
    batch_col = f"batch{args.batch}_decode_tok/s"
    print(f"{'mode':<12} {'adapter':<14} {'prefill_tok/s':>14} {'decode_tok/s':>14} {batch_col:>20}")
    for label, (p, d, b) in (("none", none), (LORA_LABEL, lora)):
        print(f"{MODE:<12} {label:<14} {p:>14.1f} {d:>14.2f} {fmt_opt(b, 2):>20}")
    ratio_b = None if none[2] is None else lora[2] / none[2]
    print(f"{MODE:<12} {'ratio_lora/none':<14} {lora[0] / none[0]:>14.3f} {lora[1] / none[1]:>14.3f} {fmt_opt(ratio_b, 3):>20}")


if __name__ == "__main__":
    main()
