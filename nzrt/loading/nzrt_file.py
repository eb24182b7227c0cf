"""A ``.nzrt`` written by ``nzrt compress`` (or ``run.save``) as a model: built on the meta device
from the stored config, its weights left compressed in the file's memory map."""
from __future__ import annotations

from pathlib import Path

from ..format import rowchunks
from .entries import INPUTS_PREFIX, MODEL_META_KEY, tokenizer_from_entries
from .errors import ModelError
from .factory import load_factory
from .loaded import LoadedModel, parse_dtype
from .transformers_dir import quiet_transformers


def load_checkpoint(path: Path, device=None) -> LoadedModel:
    """A ``.nzrt`` written by ``nzrt compress``: built on the meta device, weights stay compressed."""
    import torch

    from ..format.checkpoint import load, load_metadata

    meta = load_metadata(path)
    info = meta.get(MODEL_META_KEY)
    if not isinstance(info, dict):
        raise ModelError(f"{path} holds tensors but no model config (it was not written by "
                         f"`nzrt compress`); re-create it with `nzrt compress MODEL {path.name}`")
    tensors = load(path, verify=False)  # each blob is checked when first used: no read now
    arch = info.get("architecture")
    dtype = parse_dtype(info.get("dtype"))
    if info.get("factory"):
        lm = load_factory(info["factory"], meta=True)
        model = lm.model
    else:
        transformers = quiet_transformers()
        cfg = dict(info.get("config") or {})
        try:
            config = transformers.AutoConfig.for_model(**cfg)
            cls = getattr(transformers, arch)
        except (AttributeError, KeyError, ValueError, TypeError) as e:
            raise ModelError(f"{path}: this transformers cannot build {arch!r} from the stored config "
                             f"({e}); use the transformers version that wrote it") from None
        with torch.device("meta"):
            model = cls(config)
        lm = LoadedModel(model, None, info.get("kind", "module"))
    if dtype is not None:
        model.to(dtype)
    model.eval()
    params = dict(model.named_parameters())
    chunked = rowchunks.gather(tensors, info.get(rowchunks.META_KEY) or {}, str(path))
    missing = [n for n in params if n not in tensors and n not in chunked]
    if missing:
        raise ModelError(f"{path} lacks {len(missing)} weights of {arch} (first: {missing[0]!r}); "
                         f"re-create it with `nzrt compress`")
    for name, b in list(model.named_buffers()):
        if name in tensors:
            modname, _, attr = name.rpartition(".")
            sub = model.get_submodule(modname) if modname else model
            sub._buffers[attr] = tensors[name].clone()
        elif b.device.type == "meta":
            raise ModelError(f"{path} lacks the buffer {name!r}; re-create it with `nzrt compress`")
    for p in model.parameters():
        p.requires_grad_(False)
    compressed = {n: chunked[n] if n in chunked else tensors[n] for n in params}
    tokenizer = tokenizer_from_entries(tensors)
    if info.get("inputs"):
        stored = {k[len(INPUTS_PREFIX):]: v for k, v in tensors.items() if k.startswith(INPUTS_PREFIX)}
        lm.inputs = stored if info["inputs"] == "dict" else tuple(stored[k] for k in sorted(stored, key=int))
    elif lm.inputs is not None:
        lm.inputs = None  # made under the meta device: not runnable
    lm.model, lm.tokenizer, lm.compressed = model, tokenizer, compressed
    lm.kind = info.get("kind", lm.kind)
    lm.name = info.get("name") or path.stem
    lm.source = str(path)
    lm.metadata = meta
    return lm
