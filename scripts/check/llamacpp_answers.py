"""Greedy answers of llama.cpp (llama-cpp-python) on a GGUF model, optionally with a LoRA GGUF.

    PY scripts/check/llamacpp_answers.py MODEL.gguf LORA.gguf|- EVAL_JSONL N

Prints one JSON line per row of the first N rows of EVAL_JSONL: the last user message and
llama.cpp's greedy answer (chat template from the GGUF, at most 16 new tokens), in the format
scripts/check/answers.sh compares with `lowrank generate`.
"""
import json, sys
from llama_cpp import Llama

model, lora, eval_path, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
kw = {} if lora == "-" else {"lora_path": lora}
llm = Llama(model_path=model, n_ctx=512, n_threads=2, seed=0, verbose=False, **kw)
rows = [json.loads(l) for l in open(eval_path) if l.strip()][:n]
for r in rows:
    msgs = r["messages"][:-1]
    out = llm.create_chat_completion(messages=msgs, max_tokens=16, temperature=0.0, top_k=1)
    answer = out["choices"][0]["message"]["content"].strip()
    print(json.dumps({"question": msgs[-1]["content"], "answer": answer}), flush=True)
