"""``LoadedModel``: a model ready to run with what its users need around it (tokenizer, kind,
compressed weights of a meta model), and the small rules every loader applies (kind, dtype, eval mode)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import ModelError

Progress = Callable[[int, int, str], None]  # (done, total, what)


@dataclass
class LoadedModel:
    """A model ready to run, with what its users (the CLI, ``from_pretrained``) need around it."""

    model: Any  # torch.nn.Module, in eval mode
    tokenizer: Any = None
    kind: str = "module"  # "causal-lm" | "encoder" | "module"
    name: str = ""
    source: str = ""  # how to load it again (the MODEL argument, or a description)
    # a meta model's weights: name -> CompressedTensor (a .nzrt's memory map) or a mapping that
    # reads each dense tensor from disk when asked (nzrt.loading.safetensors_io.SafetensorsDir)
    compressed: Any = None
    inputs: Any = None  # example inputs of a factory model (tuple, dict or tensor)
    metadata: dict = field(default_factory=dict)
    _dematerialize: dict | None = field(default=None, repr=False)

    @property
    def on_meta(self) -> bool:
        return any(p.device.type == "meta" for p in self.model.parameters())

    @property
    def dtype(self):
        for p in self.model.parameters():
            if p.is_floating_point():
                return p.dtype
        return None

    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def dense_nbytes(self) -> int:
        """Bytes of the dense parameters (tied weights once)."""
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def materialize(self, device=None) -> "LoadedModel":
        """Decode every compressed weight into an ordinary dense parameter (a plain model).

        For a model loaded from a ``.nzrt`` this builds the whole dense model: use it for the
        plain baseline only; ``managed()`` runs without it.
        """
        if self.compressed is None:
            return self
        import torch

        from ..codec import decompress

        replace = {}
        by_name = dict(self.model.named_parameters())
        for name, p in by_name.items():
            if p.device.type != "meta":
                continue
            src = self.compressed.get(name)
            if src is None:
                raise ModelError(f"the checkpoint has no tensor {name!r}; re-create it with `nzrt compress`")
            dense = decompress(src) if not isinstance(src, torch.Tensor) else src.clone()  # RowChunks too
            if device is not None:
                dense = dense.to(device)
            replace[id(p)] = torch.nn.Parameter(dense, requires_grad=False)
        _swap_parameters(self.model, replace)
        self._dematerialize = self.compressed
        self.compressed = None
        return self

    def dematerialize(self) -> "LoadedModel":
        """Undo ``materialize()``: parameters back on the meta device, the compressed (memory-mapped)
        weights handed to the runtime again. No-op for a model that was never compressed."""
        import torch

        comp = getattr(self, "_dematerialize", None)
        if comp is None:
            return self
        replace = {id(p): torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                             requires_grad=False)
                   for n, p in self.model.named_parameters() if n in comp}
        _swap_parameters(self.model, replace)
        self.compressed, self._dematerialize = comp, None
        return self


def _swap_parameters(model, replace: dict) -> None:
    """Replace parameters by identity everywhere they occur (tied weights stay tied)."""
    for mod in model.modules():
        for key, p in list(mod._parameters.items()):
            if p is not None and id(p) in replace:
                mod._parameters[key] = replace[id(p)]


def parse_dtype(dtype):
    """None/'auto' -> None; 'bf16', 'bfloat16', torch.bfloat16 ... -> torch dtype."""
    if dtype is None or dtype == "auto":
        return None
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
             "float": "float32", "bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}
    key = str(dtype).lower().removeprefix("torch.")
    if key not in names:
        raise ModelError(f"unsupported dtype {dtype!r}; use bfloat16, float16, float32 or auto")
    return getattr(torch, names[key])


def class_name(model) -> str:
    """The model's class name. FSDP2's ``fully_shard`` swaps a module's class for a subclass
    ``FSDP<Name>(FSDPModule, <Name>)``: the name of the class under it (what loads it back)."""
    cls = type(model)
    bases = cls.__bases__
    if len(bases) == 2 and bases[0].__name__ == "FSDPModule" and cls.__name__ == f"FSDP{bases[1].__name__}":
        cls = bases[1]
    return cls.__name__


def kind_of(model) -> str:
    """"causal-lm", "encoder" (a transformers model without an LM head) or "module"."""
    cls = class_name(model)
    if cls.endswith("ForCausalLM") or cls.endswith("LMHeadModel"):
        return "causal-lm"
    if hasattr(model, "config") and hasattr(model.config, "model_type"):
        return "encoder"
    return "module"


def finish(model, dtype=None):
    """The model as every loader hands it over: in ``dtype`` if given, eval mode, no gradients,
    and not marked quantized (its weights are ordinary dense tensors)."""
    import torch

    if dtype is not None:
        model.to(dtype)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    # transformers marks GGUF-loaded models as quantized; the weights are ordinary dense tensors
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            try:
                del model.config.quantization_config
            except AttributeError:  # pragma: no cover
                pass
        if hasattr(model, "is_quantized"):
            try:
                model.is_quantized = False
            except AttributeError:  # pragma: no cover
                pass
    return torch.nn.Module.eval(model)
