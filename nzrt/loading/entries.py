"""What a model ``.nzrt`` holds besides its weights: the model metadata (how to rebuild the model)
and the internal entries (tokenizer files, example inputs), written by ``nzrt compress`` and
``run.save`` and read back by ``load_checkpoint``."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import ModelError
from .loaded import LoadedModel, class_name

INTERNAL_PREFIX = "__nzrt__/"  # entries that are not model weights
TOKENIZER_PREFIX = INTERNAL_PREFIX + "tokenizer/"
INPUTS_PREFIX = INTERNAL_PREFIX + "inputs/"
MODEL_META_KEY = "nzrt_model"
MODEL_META_VERSION = 1


def _json_safe(obj):
    try:
        return json.loads(json.dumps(obj, default=lambda o: str(o)))
    except (TypeError, ValueError):
        return None


def model_metadata(lm: LoadedModel, mantissa_bits: int | None) -> dict:
    """``{MODEL_META_KEY: info}``: what ``load_checkpoint`` rebuilds ``lm``'s model from (a
    transformers config, or the factory that made it)."""
    from .. import __version__

    model = lm.model
    info = {"version": MODEL_META_VERSION, "kind": lm.kind, "name": lm.name,
            "architecture": class_name(model), "dtype": str(lm.dtype).removeprefix("torch."),
            "mantissa_bits": mantissa_bits, "source": lm.source, "nzrt_version": __version__}
    if hasattr(model, "config") and hasattr(model.config, "to_dict") and lm.kind != "module":
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        cfg.pop("_name_or_path", None)
        cfg["dtype"] = info["dtype"]
        info["config"] = _json_safe(cfg)
    elif ":" in (lm.source or ""):
        info["factory"] = lm.source
    else:
        raise ModelError("only transformers models and package.module:factory models can be "
                         "written to a .nzrt (the checkpoint must say how to rebuild the model)")
    return {MODEL_META_KEY: info}


def tokenizer_entries(tokenizer):
    """(TOKENIZER_PREFIX + file name, uint8 tensor) for each file ``tokenizer.save_pretrained`` writes."""
    if tokenizer is None:
        return []
    import tempfile

    import torch

    out = []
    with tempfile.TemporaryDirectory(prefix="nzrt-tok-") as tmp:
        try:
            tokenizer.save_pretrained(tmp)
        except Exception:
            return []
        for f in sorted(Path(tmp).iterdir()):
            if f.is_file():
                data = bytearray(f.read_bytes())
                out.append((TOKENIZER_PREFIX + f.name, torch.frombuffer(data, dtype=torch.uint8)
                            if data else torch.zeros(0, dtype=torch.uint8)))
    return out


def tokenizer_from_entries(tensors: dict):
    """The tokenizer stored by ``tokenizer_entries`` among a checkpoint's tensors, or None."""
    files = {k[len(TOKENIZER_PREFIX):]: v for k, v in tensors.items() if k.startswith(TOKENIZER_PREFIX)}
    if not files:
        return None
    import tempfile

    from .transformers_dir import quiet_transformers

    transformers = quiet_transformers()
    with tempfile.TemporaryDirectory(prefix="nzrt-tok-") as tmp:
        for fname, t in files.items():
            (Path(tmp) / Path(fname).name).write_bytes(t.numpy().tobytes())
        return transformers.AutoTokenizer.from_pretrained(tmp)
