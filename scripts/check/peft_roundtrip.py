"""Greedy answers of transformers (+ PEFT with an adapter that lowrank trained).

    scripts/reference/python scripts/check/peft_roundtrip.py ADAPTER_DIR|- MODEL_DIR EVAL_JSONL N

Loads MODEL_DIR (an HF form of the default model, f32) with its own tokenizer files and, unless
ADAPTER_DIR is `-`, the adapter with `PeftModel.from_pretrained` (any warning about missing or
unexpected keys fails the run), then
prints one JSON line per row of the first N rows of EVAL_JSONL: the prompt's last user message
and the greedy answer (max 16 new tokens). scripts/check/peft_roundtrip.sh and
scripts/check/merged_hf.sh compare these with `lowrank generate --adapter ADAPTER_DIR`.
With QUANTIZE=nf4 in the environment, the base's block projections load as bitsandbytes NF4
(blocks of 64, double quantisation, f32 compute), as `lowrank generate --quantize nf4` holds them.
"""
import json, os, sys, warnings
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel

adapter, model_dir, eval_path, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
torch.set_num_threads(2)
tok = AutoTokenizer.from_pretrained(model_dir)
if os.environ.get("QUANTIZE") == "nf4":
    from transformers import BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, quantization_config=q, device_map="cpu")
elif os.environ.get("QUANTIZE"):
    sys.exit(f"QUANTIZE={os.environ['QUANTIZE']}: only nf4 is known")
else:
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
model = base.eval()
if adapter != "-":
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model = PeftModel.from_pretrained(base, adapter).eval()
rows = [json.loads(l) for l in open(eval_path) if l.strip()][:n]
for r in rows:
    msgs = r["messages"][:-1]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    print(json.dumps({"question": msgs[-1]["content"], "answer": answer}), flush=True)
