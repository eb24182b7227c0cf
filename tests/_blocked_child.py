"""Child process for tests/test_blocked_head.py (each ONEDNN_MAX_CPU_ISA cap is set before torch
loads): a frozen Llama with a tied head, plain against ``nzrt.managed``.

    python _blocked_child.py ARCH HIDDEN VOCAB TOKENS

ARCH: llama, or gemma3 (transformers' Gemma3ForCausalLM: its scaled word embedding has a forward
of its own, so its lookups reach the row chunks through ``F.embedding``).

Prints one JSON line: the prompt's logits and 4 greedy tokens bit-identical to plain's
(``exact``, ``tokens_equal``), the head's path counts (``blocked``, ``whole``), how many row chunks
the tied table has, the scheduler pool's largest holding and the table's dense bytes.
"""
import json
import sys

import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

import nzrt


def main(arch: str, hidden: int, vocab: int, tokens: int) -> dict:
    torch.manual_seed(0)
    if arch == "gemma3":
        cfg = Gemma3TextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                               max_position_embeddings=256, sliding_window=32)
        model = Gemma3ForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    else:
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                          num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True,
                          max_position_embeddings=256)
        model = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    model = model.eval().requires_grad_(False)
    with torch.no_grad():  # std-0.02 weights, as trained ones (the default init gives the head 0.02 too)
        for p in model.parameters():
            p.normal_(0, 0.02)
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits.clone()
        ref_tokens = model.generate(ids, max_new_tokens=4, do_sample=False)
    with nzrt.managed(model) as run:
        with torch.no_grad():
            out = model(ids).logits.clone()
            out_tokens = model.generate(ids, max_new_tokens=4, do_sample=False)
        chunks = sum(1 for u in run.units if u.startswith("lm_head#"))
        res = {"exact": torch.equal(ref.view(torch.int16), out.view(torch.int16)),
               "tokens_equal": torch.equal(ref_tokens, out_tokens), "chunks": chunks,
               "pool_peak": run.scheduler.pool.peak_bytes, "table_bytes": vocab * hidden * 2,
               # the buffers of layers below a slot's minimum, kept beside the slots (all free now)
               "pool_small_bytes": sum(b[0].numel() * b[0].element_size() for bufs in run.scheduler.pool._free.values()
                                       for b in bufs),
               **run.blocked_stats}
    res["restored"] = type(model.lm_head.weight) is torch.nn.Parameter and model.lm_head.weight is \
        model.model.embed_tokens.weight
    return res


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], *map(int, sys.argv[2:]))))
