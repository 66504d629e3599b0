"""Drives `lowrank serve` with the official `openai` Python package (crates/lowrank-cli/tests/serve.rs).

    PY scripts/check/openai_client.py BASE_URL BASE_MODEL ADAPTER

Prints one line per check: the chat answer of the base model, the same streamed, a completion,
the adapter's chat answer (as JSON), the model list, and the status of a request for an unknown model.
"""
import json
import sys

import openai

base_url, base, adapter = sys.argv[1], sys.argv[2], sys.argv[3]
client = openai.OpenAI(base_url=base_url, api_key="unused")
q = [{"role": "user", "content": "What is the capital of France?"}]

r = client.chat.completions.create(model=base, messages=q, max_tokens=24, temperature=0)
print("chat:", r.choices[0].message.content, r.choices[0].finish_reason, r.usage.total_tokens)
parts = []
for chunk in client.chat.completions.create(model=base, messages=q, max_tokens=24, temperature=0, stream=True):
    if chunk.choices and chunk.choices[0].delta.content:
        parts.append(chunk.choices[0].delta.content)
print("stream:", "".join(parts))
c = client.completions.create(model=base, prompt="The capital of France is", max_tokens=4, temperature=0)
print("completion:", repr(c.choices[0].text), c.choices[0].finish_reason)
r = client.chat.completions.create(model=adapter, messages=q, max_tokens=16, temperature=0)
print("adapter:", json.dumps(r.choices[0].message.content))
print("models:", sorted(m.id for m in client.models.list()))
try:
    client.chat.completions.create(model="no-such-model", messages=q, max_tokens=4)
    print("not found: no error")
except openai.NotFoundError as e:
    print("not found:", e.status_code)
