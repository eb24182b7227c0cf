"""Greedy text generation with tokens streamed as they come (``nzrt generate``)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class GenerationResult:
    prompt_tokens: int
    new_tokens: list[int] = field(default_factory=list)
    text: str = ""
    seconds: float = 0.0  # wall time of generate()
    first_token_s: float | None = None

    @property
    def tokens_per_s(self) -> float:
        return len(self.new_tokens) / self.seconds if self.seconds > 0 else 0.0


def prompt_ids(tokenizer, prompt: str, *, chat: bool = False):
    if chat and getattr(tokenizer, "chat_template", None):
        enc = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        return enc["input_ids"]
    return tokenizer(prompt, return_tensors="pt").input_ids


def generate(model, tokenizer, prompt: str, *, max_new_tokens: int = 32, chat: bool = False,
             on_text: Callable[[str], None] | None = None, device=None) -> GenerationResult:
    """Greedy decoding (deterministic: the same tokens as plain ``model.generate``)."""
    import torch
    from transformers import TextStreamer

    ids = prompt_ids(tokenizer, prompt, chat=chat)
    if device is not None:
        ids = ids.to(device)
    res = GenerationResult(prompt_tokens=ids.shape[1])
    t0 = time.perf_counter()

    class _Stream(TextStreamer):
        def put(self, value):
            if res.first_token_s is None and self.next_tokens_are_prompt is False:
                res.first_token_s = time.perf_counter() - t0
            super().put(value)

        def on_finalized_text(self, text: str, stream_end: bool = False):
            if on_text is not None and text:
                on_text(text)

    streamer = _Stream(tokenizer, skip_prompt=True, skip_special_tokens=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, streamer=streamer, pad_token_id=pad)
    res.seconds = time.perf_counter() - t0
    res.new_tokens = out[0, ids.shape[1]:].tolist()
    res.text = tokenizer.decode(res.new_tokens, skip_special_tokens=True)
    return res
