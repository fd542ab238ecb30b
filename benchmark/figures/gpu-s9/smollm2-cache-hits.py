"""SmolLM2 on CPU, offload_access: direct: the device block cache's hit shares in prefill and in decode on real
text (this repository's docs, 16K tokens) with a trained model. Output: smollm2-cache-hits-32.log.

    python benchmark/figures/gpu-s9/smollm2-cache-hits.py 32   # max_cached_block
"""
import glob
import sys

import torch
from transformers import GenerationConfig

sys.path.insert(0, "/work/main")
from benchmark.common import load_for_eval, prefill_chunks  # noqa: E402
from inf_llm.adapter import InfLLMCache, cache_kwargs  # noqa: E402

slots = sys.argv[1] if len(sys.argv) > 1 else "32"
model, tok, cfg = load_for_eval(None, ["model.offload=true", "model.offload_access=direct", "model.pin_memory=true",
                                       f"model.max_cached_block={slots}"])
text = "".join(open(p).read() for p in sorted(glob.glob("/work/main/docs/*.md")))
msgs = [{"role": "user", "content": text + "\n\nSummarize the documents above in a few paragraphs."}]
ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")
ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
ids = ids[:, -16000:] if ids.shape[1] > 16000 else ids
print("prompt tokens", ids.shape[1])
cache = InfLLMCache(model)
with torch.inference_mode():
    prefill_chunks(model, cfg, cache, ids, 0, ids.shape[1] - 1)


def hits():
    st = cache.stats()
    return sum(s.cache_hits for s in st), sum(s.cache_misses for s in st)


h0, m0 = hits()
with torch.inference_mode():
    out = model.generate(ids, generation_config=GenerationConfig(max_new_tokens=128, do_sample=False,
                         pad_token_id=tok.eos_token_id), **cache_kwargs(model, cache))
h1, m1 = hits()
print(f"slots {slots}: prefill hits {h0 / (h0 + m0):.1%} of {h0 + m0}; "
      f"decode hits {(h1 - h0) / (h1 - h0 + m1 - m0):.1%} of {h1 - h0 + m1 - m0}")
print(repr(tok.decode(out[0, ids.shape[1]:])[:300]))
