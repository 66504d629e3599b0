"""PEFT + transformers side of scripts/parity/learning.sh: trains a LoRA adapter on a shipped
example task (examples/dates/ or examples/roman/) with `lowrank train`'s example defaults, then
reports held-out loss and greedy exact match on all of its eval.jsonl, defined as lowrank defines
them.

usage: learning_peft.py MODEL_DIR --out DIR [--settings lowrank_train.json] [--seed S] [--threads K]
                        [--order own|lowrank] [--quantize nf4] [--no-exact-match] [--before] [--steps N] [--lr LR] ...

--settings takes the hyper-parameters from the resolved settings a `lowrank train` run wrote
(OUT/lowrank_train.json), so the two sides cannot drift apart, including the train and eval files,
and refuses settings this script does not mirror (grad accumulation, another schedule, dropout,
rsLoRA, weight decay, other targets).

What is mirrored from lowrank (crates/lowrank/src):
- examples (data/encode.rs): the chat template rendered with add_generation_prompt=False, encoded
  without special tokens; targets are the assistant turn's tokens, from the end of the prompt
  rendered *with* the generation prompt through the turn's `<|im_end|>` (the newline after it is
  input, not a target; no eos is appended since the template closes the turn); cut at
  max_seq_len (512).
  prompt/completion rows: the prompt encoded alone with special tokens, then the completion encoded
  alone without, then `<|im_end|>` (the tokenizer's eos); targets are the completion and the eos.
  The prompt's ids are those generation starts from, so a prompt ending in a space keeps its own
  space token (encoding the joined string would merge it into the completion's first token).
- loss (train/step.rs, train/loss.rs): mean next-token cross-entropy over the target tokens of the
  whole micro-batch (tokens pooled across its sequences, not a mean of per-sequence means);
  held-out loss (train/trainer.rs eval_loss): summed cross-entropy over every eval target / count.
- optimiser: AdamW betas (0.9, 0.999) eps 1e-8 weight decay 0, global-norm clip 1.0, transformers'
  get_cosine_schedule_with_warmup (lr 0 at step 0 of the warmup), batch 4, no accumulation.
- LoRA r 16 alpha 32 dropout 0 on all linear layers of the blocks (PEFT "all-linear").
- `--quantize nf4` (or `"quantize": "nf4"` in the settings): QLoRA as transformers + bitsandbytes
  run it, the block projections loaded as bitsandbytes Linear4bit (NF4, blocks of 64, double
  quantisation, compute dtype f32; embeddings, norms and the tied LM head stay f32), as
  `lowrank train --quantize nf4` quantises them. Needs `pip install bitsandbytes` (0.50 runs on
  the CPU). prepare_model_for_kbit_training is not called: everything else is already f32, and it
  would turn on gradient checkpointing, which changes nothing numerically. `--quantize
  nf4-dequantized` trains plain f32 layers holding the NF4 layers' dequantised weights instead.
- data order: batches of 4 consecutive indices of a per-epoch permutation. `--order own` (default)
  shuffles with Python's random.Random(seed * 1000 + epoch); `--order lowrank` reproduces lowrank's
  permutation (SplitMix64 + Fisher-Yates, data/shuffle.rs), so only the adapter's random init (torch
  here, rand's StdRng there) and the arithmetic differ.
- exact match (lowrank-cli commands/example.rs): greedy reply to the user turn (chat template with
  add_generation_prompt), or to the raw prompt (encoded with special tokens), at most (longest reference answer in tokens + 4) new tokens, stop at
  `<|im_end|>`, decoded without special tokens, stripped, compared with the reference.

Writes OUT/metrics.jsonl (step, loss, eval_loss, lr, grad_norm as lowrank's) and OUT/answers.jsonl,
and prints a last line `result final_loss X eval_loss Y exact C total N train_s T eval_s E`.
"""
import argparse, json, math, random, time
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, get_cosine_schedule_with_warmup

REPO = Path(__file__).resolve().parents[2]
MASK64 = (1 << 64) - 1


def rows(path):
    """Each row as (prompt messages or prompt text, reference answer, the row itself)."""
    out = []
    for line in open(path, encoding="utf-8"):
        if line.strip():
            r = json.loads(line)
            out.append((r["messages"][:-1], r["messages"][-1]["content"], r) if "messages" in r else (r["prompt"], r["completion"], r))
    return out


class Encoder:
    def __init__(self, tok, max_len):
        self.tok, self.max_len, self.eos = tok, max_len, tok.convert_tokens_to_ids("<|im_end|>")

    def ids(self, messages, generation_prompt):
        text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        return self.tok(text, add_special_tokens=False).input_ids

    def prompt_ids(self, prompt):
        """The ids generation starts from: a conversation rendered for the next assistant turn, or a raw prompt."""
        if isinstance(prompt, str):
            return self.tok(prompt).input_ids
        return self.ids(prompt, True)

    def example(self, row):
        if "messages" not in row:
            # lowrank's rule (data/encode.rs): the joined ids when they extend the prompt's, else the
            # prompt's ids then the completion's, unless that reads differently (SentencePiece's
            # dummy prefix), where the joined ids stay, split at the first difference.
            p = self.prompt_ids(row["prompt"])
            joined = self.tok(row["prompt"] + row["completion"]).input_ids
            if joined[: len(p)] == p:
                ids, boundary = joined, len(p)
            else:
                apart = p + self.tok(row["completion"], add_special_tokens=False).input_ids
                if self.tok.decode(apart) == self.tok.decode(joined):
                    ids, boundary = apart, len(p)
                else:
                    boundary = next((i for i, (a, b) in enumerate(zip(joined, apart)) if a != b), min(len(joined), len(apart)))
                    ids = joined
            if ids[-1:] != [self.eos]:
                ids = ids + [self.eos]
            targets = [t >= boundary for t in range(len(ids))]
            targets[0] = False
            return ids[: self.max_len], targets[: self.max_len]
        messages = row["messages"]
        ids = self.ids(messages, False)
        targets = [False] * len(ids)
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before, through = self.ids(messages[:i], True), self.ids(messages[: i + 1], False)
            assert ids[: len(through)] == through and through[: len(before)] == before, "template not prefix-stable"
            span = range(len(before), len(through))
            end = next((t + 1 for t in reversed(span) if ids[t] == self.eos), span.stop)
            for t in range(span.start, end):
                targets[t] = True
            assert end > span.start and ids[end - 1] == self.eos, "assistant turn not closed by <|im_end|>"
        targets[0] = False
        return ids[: self.max_len], targets[: self.max_len]


def splitmix_permutation(n, seed, stream):
    """lowrank's data/shuffle.rs `permutation(n, seed, stream)`."""
    state = [seed & MASK64]

    def next_u64():
        state[0] = (state[0] + 0x9E3779B97F4A7C15) & MASK64
        z = state[0]
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)

    mixed = next_u64() ^ ((stream * 0xD1B54A32D192ED03) & MASK64)
    state[0] = mixed
    order = list(range(n))
    for i in range(n - 1, 0, -1):
        bound = i + 1
        zone = MASK64 - (MASK64 % bound)
        while True:
            x = next_u64()
            if x < zone:
                break
        j = x % bound
        order[i], order[j] = order[j], order[i]
    return order


def permutation(kind, n, seed, epoch):
    if kind == "lowrank":
        return splitmix_permutation(n, seed, epoch)
    order = list(range(n))
    random.Random(seed * 1000 + epoch).shuffle(order)
    return order


def batch_tensors(examples, pad):
    """Right-padded ids, attention mask and next-token labels (-100 where no loss)."""
    T = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), T), pad, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    labels = torch.full((len(examples), T), -100, dtype=torch.long)
    for b, (x, tg) in enumerate(examples):
        ids[b, : len(x)] = torch.tensor(x)
        mask[b, : len(x)] = 1
        labels[b, : len(x)] = torch.tensor([t if keep else -100 for t, keep in zip(x, tg)])
    return ids, mask, labels


def ce_sum(model, examples, pad):
    """(sum of next-token cross-entropy over the targets, number of targets)."""
    ids, mask, labels = batch_tensors(examples, pad)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    tgt = labels[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tgt.reshape(-1), ignore_index=-100, reduction="sum")
    return loss, int((tgt != -100).sum())


@torch.no_grad()
def eval_loss(model, examples, batch, pad):
    total, count = 0.0, 0
    for i in range(0, len(examples), batch):
        s, c = ce_sum(model, examples[i : i + batch], pad)
        total, count = total + float(s), count + c
    return total / count


@torch.no_grad()
def exact_match(model, tok, enc, eval_rows, eos):
    max_new = max(len(tok(ref, add_special_tokens=False).input_ids) for _, ref, _ in eval_rows) + 4
    answers, correct = [], 0
    for prompt, ref, _ in eval_rows:
        ids = torch.tensor([enc.prompt_ids(prompt)])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                             eos_token_id=eos, pad_token_id=eos)
        ans = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
        correct += ans == ref.strip()
        answers.append({"reference": ref, "answer": ans})
    return correct, answers


def dequantized_copy(model_dir, quantized):
    """The f32 model with each bitsandbytes 4-bit layer's weight replaced by its dequantisation."""
    import bitsandbytes.functional as BF

    dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    layers = dict(quantized.named_modules())
    for name, mod in dense.named_modules():
        q = layers.get(name)
        if q is not None and q.__class__.__name__ == "Linear4bit":
            mod.weight.data.copy_(BF.dequantize_4bit(q.weight.data, q.weight.quant_state).float().reshape(mod.weight.shape))
    return dense


def from_settings(a):
    """Overrides `a` with a lowrank run's resolved settings; fails on what is not mirrored."""
    s = json.load(open(a.settings))
    t, ad = s["train"], s["adapter"]
    unsupported = {
        "grad_accum": (t["grad_accum"], 1), "schedule": (t["schedule"], "cosine"),
        "weight_decay": (t["adamw"]["weight_decay"], 0.0), "betas/eps": ((t["adamw"]["beta1"], t["adamw"]["beta2"], t["adamw"]["eps"]), (0.9, 0.999, 1e-8)),
        "max_grad_norm": (t["max_grad_norm"], 1.0), "lora_dropout": (ad["lora_dropout"], 0.0), "use_rslora": (ad["use_rslora"], False),
        "target_modules": (ad["target_modules"], "all-linear"), "lora_alpha": (ad["lora_alpha"], 2 * ad["r"]),
        "train_on_prompt": (s["train_on_prompt"], False), "epochs": (s["epochs"], None),
        "eval_split": (s["eval_split"], None),
    }
    bad = [f"{k} = {v!r} (mirrored: {want!r})" for k, (v, want) in unsupported.items() if v != want]
    if bad:
        raise SystemExit(f"{a.settings}: not mirrored here: " + "; ".join(bad))
    a.steps, a.lr, a.warmup, a.batch, a.rank = t["steps"], t["lr"], t["warmup"], t["batch_size"], ad["r"]
    a.max_seq_len, a.eval_every, a.seed = s["max_seq_len"], t["eval_every"] or 0, t["seed"]
    a.quantize = s.get("quantize")
    if s["eval_data"] is None:
        raise SystemExit(f"{a.settings}: the run has no eval_data file to score")
    a.train, a.eval = s["data"], s["eval_data"]
    print(f"settings from {a.settings}: steps {a.steps} lr {a.lr} warmup {a.warmup} batch {a.batch} r {a.rank} "
          f"max_seq_len {a.max_seq_len} eval_every {a.eval_every} seed {a.seed} quantize {a.quantize} "
          f"train {a.train} eval {a.eval}", flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--order", choices=["own", "lowrank"], default="own")
    p.add_argument("--quantize", choices=["nf4", "nf4-dequantized"],
                   help="QLoRA: the block projections in bitsandbytes NF4 (nf4-dequantized: plain f32 layers holding those weights)")
    p.add_argument("--no-exact-match", action="store_true", help="skip the greedy answers (slow with bitsandbytes on CPU)")
    p.add_argument("--before", action="store_true", help="also score the base model first")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--train", default=str(REPO / "examples/dates/train.jsonl"))
    p.add_argument("--eval", default=str(REPO / "examples/dates/eval.jsonl"))
    p.add_argument("--settings", help="take the hyper-parameters from a lowrank run's lowrank_train.json")
    a = p.parse_args()
    if a.settings:
        from_settings(a)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)

    tok = AutoTokenizer.from_pretrained(a.model)
    enc = Encoder(tok, a.max_seq_len)
    train_rows, eval_rows = rows(a.train), rows(a.eval)
    train, held = [enc.example(r) for _, _, r in train_rows], [enc.example(r) for _, _, r in eval_rows]
    for name, d in (("train", train), ("eval", held)):
        print(f"{name}: {len(d)} rows, {sum(len(x) for x, _ in d)} tokens, {sum(map(sum, (t for _, t in d)))} targets", flush=True)

    if a.quantize in ("nf4", "nf4-dequantized"):
        from transformers import BitsAndBytesConfig

        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, quantization_config=q, device_map="cpu")
        # bitsandbytes 0.50.2 on a CPU with AVX-512 BF16: the first eval-mode, no-grad forward of a
        # Linear4bit repacks its weight into a CPU inference layout, and nothing unpacks it when
        # training resumes, so every later training step computes wrong outputs and gradients
        # (scripts/check/bnb_backward.py --after-eval). Keep the training layout throughout.
        for m in model.modules():
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = False
        if a.quantize == "nf4-dequantized":
            model = dequantized_copy(a.model, model)
    else:
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    if a.before:
        model.eval()
        c, _ = exact_match(model, tok, enc, eval_rows, enc.eos)
        print(f"before: exact {c}/{len(eval_rows)}", flush=True)
    cfg = LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    params = [q for q in model.parameters() if q.requires_grad]
    print(f"trainable {sum(q.numel() for q in params)} parameters", flush=True)
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, a.warmup, a.steps)

    per_epoch = math.ceil(len(train) / a.batch)
    metrics = open(out / "metrics.jsonl", "w")
    t0 = time.perf_counter()
    for step in range(a.steps):
        epoch, k = divmod(step, per_epoch)
        order = permutation(a.order, len(train), a.seed, epoch)
        batch = [train[i] for i in order[k * a.batch : (k + 1) * a.batch]]
        model.train()
        s, c = ce_sum(model, batch, enc.eos)
        loss = s / c
        loss.backward()
        gn = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
        lr = sched.get_last_lr()[0]
        opt.step(); sched.step(); opt.zero_grad(set_to_none=True)
        m = {"step": step + 1, "loss": loss.item()}
        if (a.eval_every and (step + 1) % a.eval_every == 0) or step + 1 == a.steps:
            model.eval()
            m["eval_loss"] = eval_loss(model, held, a.batch, enc.eos)
        m.update(lr=lr, grad_norm=gn)
        metrics.write(json.dumps(m) + "\n"); metrics.flush()
        ev = f" eval {m['eval_loss']:.4f}" if "eval_loss" in m else ""
        print(f"step {step + 1:>4}/{a.steps}  loss {m['loss']:.4f}{ev}  lr {lr:.2e}  |g| {gn:.3f}", flush=True)
    train_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    model.eval()
    correct, answers = (-1, []) if a.no_exact_match else exact_match(model, tok, enc, eval_rows, enc.eos)
    eval_s = time.perf_counter() - t0
    with open(out / "answers.jsonl", "w") as f:
        f.writelines(json.dumps(x) + "\n" for x in answers)
    print(f"held-out exact match after training: {correct}/{len(eval_rows)}")
    print(f"result final_loss {m['loss']:.6f} eval_loss {m['eval_loss']:.6f} exact {correct} total {len(eval_rows)} "
          f"train_s {train_s:.1f} eval_s {eval_s:.1f}")


if __name__ == "__main__":
    main()
