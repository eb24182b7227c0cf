"""Transformers directories as models: loaded dense by transformers, or built on the meta device
with each weight read from its safetensors file when the runtime takes it (nothing dense whole)."""
from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

from .errors import MODEL_HELP, ModelError
from .loaded import LoadedModel, finish, kind_of, parse_dtype


def quiet_transformers():
    """transformers, offline and without advisory warnings or progress bars; ModelError if missing."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        import transformers
    except ImportError:
        raise ModelError("loading a model by path needs transformers: pip install 'nzrt[hf]' "
                         "(or pip install transformers gguf)") from None

    transformers.utils.logging.set_verbosity_error()
    try:
        transformers.utils.logging.disable_progress_bar()
    except AttributeError:  # pragma: no cover
        pass
    return transformers


def load_transformers_dir(path: Path, dtype=None, source: str | None = None) -> LoadedModel:
    """A transformers directory loaded dense by ``from_pretrained`` (with its tokenizer, if any)."""
    transformers = quiet_transformers()

    cfg_file = path / "config.json"
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: config.json is unreadable ({e}); {MODEL_HELP}") from None
    archs = cfg.get("architectures") or []
    causal = any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs)
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    try:
        model = auto.from_pretrained(str(path), dtype=dtype if dtype is not None else "auto")
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: transformers cannot load it ({str(e).splitlines()[0]}); {MODEL_HELP}") from None
    tokenizer = None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    except Exception:  # a model without a tokenizer still profiles with synthetic inputs
        tokenizer = None
    model = finish(model)
    return LoadedModel(model, tokenizer, kind_of(model), name=path.name, source=source or str(path))


def load_transformers_dir_lazy(path: Path, dtype=None, source: str | None = None) -> LoadedModel:
    """A transformers directory as a meta model whose weights are read one tensor at a time
    (``nzrt.loading.safetensors_io``): nothing dense exists until the runtime reads it. Falls back to
    ``load_transformers_dir`` where that cannot reproduce ``from_pretrained`` (no safetensors,
    checkpoint names that are not the model's, a quantized model, ...)."""
    from .safetensors_io import has_safetensors

    if not has_safetensors(path):
        return load_transformers_dir(path, dtype, source)
    built = meta_transformers_model(path, parse_dtype(dtype))
    if built is None:
        return load_transformers_dir(path, dtype, source)
    model, weights = built
    names = set(weights.keys())
    if any(n not in names for n, _ in model.named_parameters()):  # renamed keys: transformers knows them
        return load_transformers_dir(path, dtype, source)
    tokenizer = None
    try:
        tokenizer = quiet_transformers().AutoTokenizer.from_pretrained(str(path))
    except Exception:
        tokenizer = None
    model = finish(model)
    return LoadedModel(model, tokenizer, kind_of(model), name=path.name, source=source or str(path),
                       compressed=CastWeights(weights, model.config.dtype))


def meta_transformers_model(path: Path, dtype=None):
    """(model with meta parameters and real buffers, config) built from ``path/config.json`` alone,
    in the dtype ``from_pretrained(dtype=dtype or "auto")`` would give it; None where streaming
    cannot reproduce ``from_pretrained`` (quantized, fp32-kept modules, unknown architecture)."""
    transformers = quiet_transformers()
    import torch

    from .safetensors_io import SafetensorsDir

    try:
        config = transformers.AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: config.json is unreadable ({str(e).splitlines()[0]}); {MODEL_HELP}") from None
    archs = getattr(config, "architectures", None) or []
    if not archs or getattr(config, "quantization_config", None) is not None:
        return None
    cls = getattr(transformers, archs[0], None)
    if cls is None or not isinstance(cls, type) or not issubclass(cls, torch.nn.Module):
        return None
    st = SafetensorsDir(path)  # every header validated here, before a data byte is read
    if dtype is None:
        dtype = getattr(config, "dtype", None)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype, None)
        if not isinstance(dtype, torch.dtype):
            floats = [st.info(n)[0] for n in st if st.info(n)[0].is_floating_point]
            dtype = floats[0] if floats else None
    if dtype is None or not dtype.is_floating_point:
        return None
    if getattr(cls, "_keep_in_fp32_modules_strict", None) or (
            dtype == torch.float16 and getattr(cls, "_keep_in_fp32_modules", None)):
        return None
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with parameters_on_meta():
            model = cls(config)
            if hasattr(model, "tie_weights"):  # transformers ties while loading, not in __init__
                model.tie_weights()
    except Exception:  # pragma: no cover - let the dense path (and its error messages) handle it
        return None
    finally:
        torch.set_default_dtype(old)
    model.config.dtype = dtype
    model.eval()
    return model, st


@contextlib.contextmanager
def parameters_on_meta():
    """Build modules with their parameters on the meta device and their buffers real, without
    running weight initialisers (accelerate's ``init_empty_weights(include_buffers=False)``)."""
    import torch
    from torch import nn

    old = nn.Module.register_parameter

    def register(module, name, param):
        old(module, name, param)
        if param is not None and param.device.type != "meta":
            kwargs = dict(param.__dict__) if type(param) is not nn.Parameter else {}
            kwargs["requires_grad"] = param.requires_grad
            module._parameters[name] = type(param)(module._parameters[name].to("meta"), **kwargs)

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        from transformers.modeling_utils import no_init_weights
    nn.Module.register_parameter = register
    try:
        with no_init_weights(), torch.no_grad():
            yield
    finally:
        nn.Module.register_parameter = old


class CastWeights(Mapping):
    """A read-one-at-a-time mapping whose float tensors are cast to ``dtype`` as they are read."""

    def __init__(self, inner, dtype):
        self.inner, self.dtype = inner, dtype

    def __getitem__(self, key):
        t = self.inner[key]
        if t.is_floating_point() and t.dtype != self.dtype:
            t = t.to(self.dtype)
        return t

    def __contains__(self, key):
        return key in self.inner

    def mapped(self, key):
        """The inner mapping's memory-mapped tensor, when it has the wanted dtype already."""
        fn = getattr(self.inner, "mapped", None)
        t = fn(key) if fn is not None else None
        return t if t is not None and (not t.is_floating_point() or t.dtype == self.dtype) else None

    def __iter__(self):
        return iter(self.inner)

    def __len__(self):
        return len(self.inner)

    def keys(self):
        return self.inner.keys()
