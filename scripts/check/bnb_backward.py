"""bitsandbytes' CPU NF4 layers against a dense model holding their dequantised weights: one
PEFT LoRA forward and backward on each (the same gaussian A, random B, 2 x 64 random tokens),
printing the loss of both, the largest logit difference and the largest relative difference of
any LoRA gradient. Used to check the CPU backend behind PEFT's QLoRA learning figures (README,
"QLoRA learning"). Measured 2026-11-30 with bitsandbytes 0.50.2 on this AVX-512 BF16 machine:
- as is: all differences exactly 0;
- --after-eval (one eval-mode, no-grad forward first, as a training loop's evaluation does): the
  NF4 model's training-mode logits differ by up to 1.2 and its LoRA gradients by up to 3.8× their
  norm — bitsandbytes repacks Linear4bit weights for CPU inference on that forward
  (`_convert_weight_packed_for_cpu`, only when the CPU has AVX-512 BF16) and never unpacks them
  for training;
- --after-eval --no-cpu-repack (setting `support_avx512bf16_for_cpu = False` on every layer, the
  workaround learning_peft.py uses): all differences exactly 0 again.

    scripts/reference/python scripts/check/bnb_backward.py [MODEL_DIR] [--after-eval] [--no-cpu-repack]
"""
import os
import sys, warnings
from pathlib import Path

import bitsandbytes.functional as BF
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

warnings.filterwarnings("ignore")
torch.set_num_threads(1)
args = [x for x in sys.argv[1:] if not x.startswith("--")]
M = args[0] if args else str(Path(os.environ.get("LOWRANK_REFERENCE", Path.home() / ".cache/lowrank-reference")) / "smollm2-hf")
q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
mq = AutoModelForCausalLM.from_pretrained(M, dtype=torch.float32, quantization_config=q, device_map="cpu")
md = AutoModelForCausalLM.from_pretrained(M, dtype=torch.float32)
dq = {}
for name, mod in mq.named_modules():
    if mod.__class__.__name__ == "Linear4bit":
        dq[name] = BF.dequantize_4bit(mod.weight.data, mod.weight.quant_state).float()
for name, mod in md.named_modules():
    if name in dq:
        mod.weight.data.copy_(dq[name].reshape(mod.weight.shape))
print("replaced", len(dq))
cfg = lambda: LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM", init_lora_weights="gaussian")
torch.manual_seed(0); pq = get_peft_model(mq, cfg())
torch.manual_seed(0); pd = get_peft_model(md, cfg())
g = torch.Generator().manual_seed(1)
for (n1, p1), (n2, p2) in zip(pq.named_parameters(), pd.named_parameters()):
    if p1.requires_grad:
        assert n1 == n2
        if "lora_B" in n1:
            v = torch.randn(p1.shape, generator=g) * 0.01
            p1.data.copy_(v); p2.data.copy_(v)
ids = torch.randint(0, 49152, (2, 64), generator=g)
if "--no-cpu-repack" in sys.argv:
    for m in pq.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
if "--after-eval" in sys.argv:
    for m in (pq, pd):
        m.eval()
        with torch.no_grad():
            m(input_ids=ids)
outs = []
for m in (pq, pd):
    m.train()
    o = m(input_ids=ids, labels=ids)
    o.loss.backward()
    outs.append(o)
print("loss", outs[0].loss.item(), outs[1].loss.item())
print("logits max diff", (outs[0].logits - outs[1].logits).abs().max().item())
worst = 0; wn = None
for (n1, p1), (n2, p2) in zip(pq.named_parameters(), pd.named_parameters()):
    if p1.requires_grad:
        d = ((p1.grad - p2.grad).norm() / p2.grad.norm()).item()
        if d > worst: worst, wn = d, n1
print("worst relative grad diff", worst, wn)
