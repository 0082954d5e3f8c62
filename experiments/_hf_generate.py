"""Times Hugging Face transformers' greedy `generate()` (PyTorch eager, DynamicCache) on a saved
DeepSeek-V3 checkpoint; run by experiments/serving.py in a Python that has torch and
transformers (it imports nothing from dsv3_jax).

    python _hf_generate.py CHECKPOINT_DIR PROMPTS.json NEW_TOKENS REPEATS OUT.json

PROMPTS.json: {"<batch>": [[ids...], ...], ...} (equal-length prompts per batch). For each
batch: decode seconds = (generate of NEW_TOKENS) - (generate of 1 token), fastest of REPEATS,
so decode tokens/s = batch * (NEW_TOKENS - 1) / decode seconds; also the generated tokens.
"""

import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM


def main():
  ckpt, prompts_path, new_tokens, repeats, out_path = sys.argv[1:6]
  new_tokens, repeats = int(new_tokens), int(repeats)
  model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
  prompts = json.load(open(prompts_path))
  result = {"torch": torch.__version__, "threads": torch.get_num_threads()}
  for batch, ids in prompts.items():
    x = torch.tensor(ids, dtype=torch.long)
    mask = torch.ones_like(x)

    def gen(n):
      t0 = time.perf_counter()
      with torch.no_grad():
        out = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0, use_cache=True)
      return time.perf_counter() - t0, out

    gen(new_tokens)  # warm-up
    full = min(gen(new_tokens)[0] for _ in range(repeats))
    first = min(gen(1)[0] for _ in range(repeats))
    _, out = gen(new_tokens)
    decode = full - first
    result[batch] = dict(decode_s=decode, prefill_plus_one_s=first,
                         tokens_per_s=int(batch) * (new_tokens - 1) / decode,
                         ms_per_step=1e3 * decode / (new_tokens - 1),
                         tokens=out[:, x.shape[1]:].tolist())
  json.dump(result, open(out_path, "w"))


if __name__ == "__main__":
  main()
