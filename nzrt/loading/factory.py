"""``package.module:factory`` models: a callable returning an ``nn.Module`` or ``(module, example_inputs)``."""
from __future__ import annotations

import importlib

from .errors import ModelError
from .loaded import LoadedModel, finish, kind_of


def load_factory(spec: str, dtype=None, *, meta: bool = False) -> LoadedModel:
    """Call ``package.module:factory`` (under the meta device with ``meta``); its example inputs
    from a returned ``(module, inputs)`` or the module's ``example_inputs``."""
    import torch

    mod_name, _, attr = spec.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ModelError(f"cannot import {mod_name!r} for {spec!r} ({e}); check the module path "
                         f"and that it is importable from here") from None
    factory = mod
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise ModelError(f"{mod_name!r} has no attribute {attr!r}; expected package.module:factory")
    if not callable(factory):
        raise ModelError(f"{spec} is not callable; expected a function returning an nn.Module")
    if meta:
        with torch.device("meta"):
            made = factory()
    else:
        made = factory()
    if isinstance(made, LoadedModel):
        return made
    inputs = None
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module):
        made, inputs = made
    if not isinstance(made, torch.nn.Module):
        raise ModelError(f"{spec} returned {type(made).__name__}, not a torch.nn.Module "
                         f"(or a (module, example_inputs) tuple)")
    if inputs is None:
        inputs = getattr(made, "example_inputs", None)
        if callable(inputs):
            inputs = inputs()
    made = finish(made, dtype)
    return LoadedModel(made, None, kind_of(made), name=spec, source=spec, inputs=inputs)
