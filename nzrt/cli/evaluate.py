"""Quality of a (lossy) model against the lossless one: perplexity on a short public-domain text
that ships with nzrt for causal LMs, cosine similarity of sentence embeddings for encoders."""
from __future__ import annotations

import math
import re
from functools import lru_cache


@lru_cache(maxsize=1)
def eval_text() -> str:
    from importlib.resources import files

    return files("nzrt").joinpath("data", "eval.txt").read_text(encoding="utf-8")


def sentences(text: str | None = None, limit: int = 32) -> list[str]:
    text = text if text is not None else eval_text()
    parts = [s.strip() for s in re.split(r"(?<=[.!?;:])\s+", text) if len(s.strip()) > 20]
    return parts[:limit]


def perplexity(model, tokenizer, text: str | None = None, *, max_tokens: int = 1024,
               device=None) -> float:
    """exp(mean next-token NLL) over the first ``max_tokens`` tokens of ``text`` (one window)."""
    import torch

    text = text if text is not None else eval_text()
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :max_tokens]
    dev = device or _device_of(model)
    with torch.no_grad():
        logits = model(input_ids=ids.to(dev)).logits
    logits = logits[0, :-1].float()
    target = ids[0, 1:].to(logits.device)
    nll = torch.nn.functional.cross_entropy(logits, target, reduction="mean")
    return float(math.exp(float(nll)))


def embed(model, tokenizer, texts: list[str] | None = None, *, device=None):
    """Mean-pooled, L2-normalised sentence embeddings (all-MiniLM's pooling), float32 on the CPU."""
    import torch

    texts = texts if texts is not None else sentences()
    enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=128)
    dev = device or _device_of(model)
    enc = {k: v.to(dev) for k, v in enc.items()}
    with torch.no_grad():
        out = model(**enc)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    mask = enc["attention_mask"].unsqueeze(-1).to(torch.float32)
    pooled = (hidden.float() * mask).sum(1) / mask.sum(1).clamp(min=1)
    return torch.nn.functional.normalize(pooled, dim=-1).cpu()


def cosine(a, b) -> dict:
    """Per-row cosine similarity of two embedding matrices: mean and min."""
    import torch

    cos = torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)
    return {"mean": float(cos.mean()), "min": float(cos.min())}


def _device_of(model):
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return "cpu"


def quality(lm, *, reference=None, device=None) -> dict:
    """The quality number of ``lm`` (a ``nzrt.loading.loaded.LoadedModel``, in whatever state it runs now):
    {"metric": "perplexity", "value": ...} or {"metric": "cosine", "value": mean, "min": ...,
    "embeddings": tensor}. ``reference`` is the lossless result of this function (for cosine)."""
    if lm.tokenizer is None:
        return {"metric": None, "value": None}
    if lm.kind == "causal-lm":
        return {"metric": "perplexity", "value": perplexity(lm.model, lm.tokenizer, device=device)}
    emb = embed(lm.model, lm.tokenizer, device=device)
    res = {"metric": "cosine", "embeddings": emb, "value": 1.0, "min": 1.0}
    if reference is not None and reference.get("embeddings") is not None:
        c = cosine(emb, reference["embeddings"])
        res["value"], res["min"] = c["mean"], c["min"]
    return res


def min_lossy_numel() -> int:
    """Parameters smaller than this stay exact in lossy mode (the runtime keeps them dense)."""
    from ..runtime.params import DEFAULT_MIN_NUMEL

    return int(DEFAULT_MIN_NUMEL)


def lossy_copy_(model, mantissa_bits: int | None, *, progress=None) -> float:
    """Round every float parameter of ``model`` in place through the codec at ``mantissa_bits``
    (compress then decompress): exactly the weights a lossy nzrt model computes with (parameters
    below the runtime's size threshold stay exact, as under ``managed``).
    Returns the compressed size in bits per weight (tied weights once)."""
    import torch

    import nzrt

    params = [p for p in model.parameters() if p.is_floating_point() and p.device.type != "meta"]
    total = sum(p.numel() for p in params)
    done = nbytes = 0
    small = min_lossy_numel()
    with torch.no_grad():
        for p in params:
            # as the runtime does: parameters below its size threshold (norms, biases) stay exact
            k = mantissa_bits if p.numel() >= small else None
            ct = nzrt.compress(p.detach().cpu(), mantissa_bits=k)
            nbytes += ct.nbytes
            p.copy_(nzrt.decompress(ct).to(p.device))
            done += p.numel()
            if progress:
                progress(done, total, "")
    return 8.0 * nbytes / max(total, 1)
