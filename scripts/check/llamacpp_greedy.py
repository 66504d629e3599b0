"""llama.cpp's (llama-cpp-python) greedy continuation of a raw prompt, optionally with a LoRA GGUF.

    PY scripts/check/llamacpp_greedy.py MODEL.gguf LORA.gguf|- PROMPT N

Tokenizes PROMPT as `lowrank generate --prompt` does (the vocabulary's own BOS rule, special
tokens not parsed), decodes greedily until an end-of-generation token or N new tokens, and prints
the new token ids as `lowrank generate --verbose` does (`[1, 2, 3]`) and, on stderr, their text.
"""
import sys

import llama_cpp
from llama_cpp import Llama

model, lora, prompt, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
kw = {} if lora == "-" else {"lora_path": lora}
llm = Llama(model_path=model, n_ctx=128, n_threads=2, seed=0, verbose=False, **kw)
tokens = llm.tokenize(prompt.encode(), add_bos=True, special=False)
vocab = llama_cpp.llama_model_get_vocab(llm.model)
out = []
for t in llm.generate(tokens, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
    if llama_cpp.llama_vocab_is_eog(vocab, t) or len(out) == n:
        break
    out.append(t)
print(llm.detokenize(out, special=True).decode("utf-8", errors="replace"), file=sys.stderr)
print("[" + ", ".join(map(str, out)) + "]")
