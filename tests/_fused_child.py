"""Child process for tests/test_fused_runtime.py: greedy generation under ``policies.Fused``
against the fused arithmetic's numpy definition, in a process of its own (so each
ONEDNN_MAX_CPU_ISA cap is set before torch loads).

    python _fused_child.py MODEL PROMPT_TOKENS NEW_TOKENS

MODEL: tied1024 / untied1024 (a Llama, hidden 1024; tied or untied head) or smollm2 (the
embedded SmolLM2-135M in bf16). Prints one JSON line:
  ref / fused / plain: per generated step, the SHA-256 of the logits' bits, and the tokens;
  prefill_equal: the prompt's logits (more rows than max_rows: the decode-then-GEMM path) under
    nzrt bit-identical to plain's;
  stats: the fused passes' counters; the scheduler's decodes during the generation and those of
    one pass over the prompt alone (equal: the fused passes decode nothing).
The reference model is a copy of the model whose Linears compute, for inputs of at most
max_rows rows, ``fused_reference.linear_f32`` on the dense weights (numpy, one rounding at the
end), and plain ``F.linear`` otherwise.
"""
from __future__ import annotations

import copy
import hashlib
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import nzrt
from nzrt.kernels import fused_reference
from nzrt.policies import Fused

sys.path.insert(0, str(Path(__file__).parent))
from _train_child import build, eval_ids  # noqa: E402

MAX_ROWS = 16
FUSED_PASS = [False]  # the reference's pass: set from the model's input, as the runtime does


def ref_linear(self, x):
    K = x.shape[-1]
    rows = x.numel() // K
    if not FUSED_PASS[0] or rows > MAX_ROWS or self.weight.numel() < 2048:  # nzrt manages >= 2048 values
        return F.linear(x, self.weight, self.bias)
    W = fused_reference.to_f32(self.weight)
    b = None if self.bias is None else fused_reference.to_f32(self.bias)
    y32 = fused_reference.linear_f32(W, fused_reference.to_f32(x.reshape(rows, K)), b)
    bits = fused_reference.round_out(y32, str(x.dtype).removeprefix("torch."))
    y = torch.from_numpy(bits.view({2: np.int16, 4: np.int32}[bits.dtype.itemsize])).view(x.dtype)
    return y.view(*x.shape[:-1], self.out_features)


def with_reference_linears(model):
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if type(m) is torch.nn.Linear:
            m.forward = types.MethodType(ref_linear, m)
    inner = ref.forward

    def forward(*args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        FUSED_PASS[0] = ids is not None and ids.numel() <= MAX_ROWS
        try:
            return inner(*args, **kwargs)
        finally:
            FUSED_PASS[0] = False
    ref.forward = forward
    return ref


def greedy(model, ids, new):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, output_scores=True, return_dict_in_generate=True,
                             pad_token_id=0)
    steps = [hashlib.sha256(s.contiguous().view(torch.int16).numpy().tobytes()).hexdigest()[:16]
             for s in out.scores]
    return {"steps": steps, "tokens": out.sequences[0, ids.shape[1]:].tolist()}


def main():
    name, prompt_tokens, new = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    lm, text_ids = eval_ids()
    model = build(name, lm).eval().requires_grad_(False)
    if model.generation_config is not None:
        model.generation_config.eos_token_id = None  # always `new` tokens
    vocab = model.config.vocab_size
    ids = (text_ids[:prompt_tokens] % vocab).view(1, -1)
    reference = with_reference_linears(model)
    res = {"ref": greedy(reference, ids, new), "plain": greedy(model, ids, new)}
    with torch.no_grad():
        plain_prefill = model(ids).logits
    with nzrt.managed(model, policy=Fused("resident", max_rows=MAX_ROWS)) as run:
        with torch.no_grad():
            prefill = model(ids).logits
        res["prefill_equal"] = bool(torch.equal(prefill.view(torch.int16), plain_prefill.view(torch.int16)))
        decodes = lambda: sum(s.decodes for s in run.scheduler.stats.values())  # noqa: E731
        d0 = decodes()
        with torch.no_grad():
            model(ids)
        per_prompt = decodes() - d0  # what a pass over the prompt decodes
        d0 = decodes()
        res["fused"] = greedy(model, ids, new)
        st = run.fused_stats
        res["stats"] = {"passes": st.passes, "linear_calls": st.linear_calls, "lookups": st.lookup_calls,
                        "decodes": decodes() - d0, "prompt_decodes": per_prompt,
                        "linears": sum(type(m) is torch.nn.Linear for m in model.modules())}
    print(json.dumps(res))


if __name__ == "__main__":
    main()
