"""The scheduler's units and the forwards that run them: which module's weights decode together,
and the instance-level ``forward`` each such module gets for the block.

Apart from the session (``handle.py``) because it owns the mapping from modules to units and the
log of wrapped forwards that exit unwraps; the forwards themselves are in ``passes.py``,
``fused.py``, ``blocked.py`` and ``embedding.py``.
"""
from __future__ import annotations

from torch import nn

from .blocked import chunked_linear_forward
from .embedding import chunked_embedding_forward, row_lookup
from .fused import install as fused_forward
from .params import plain_embedding
from .passes import root_forward, unit_forward


class Units:
    def __init__(self):
        self.units: dict = {}          # unit -> tuple of tensor keys (the scheduler's units)
        self._module_units: dict = {}  # module -> (its unit or None, its chunked Param or None, chunk units)
        self._bindings: dict = {}      # module -> [(Param, key)]
        self._forwards: list = []      # (module, had own forward attr, old value)

    def build(self, model, params: list) -> dict:
        """One unit per module owning whole managed weights (named as the module), one per row
        chunk of a chunked weight (``name#i``); returns ``units``."""
        by_module: dict = {}
        names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
        for mp in params:
            for module, pname in mp.owners:
                by_module.setdefault(module, []).append((mp, pname))
        for module, entries in by_module.items():
            qual = names.get(id(module), type(module).__name__) or "<root>"
            plain = [(mp, mp.keys[0]) for mp, _ in entries if not mp.chunked]
            chunked = [mp for mp, _ in entries if mp.chunked]
            unit = None
            if plain:
                unit = qual
                self.units[unit] = tuple(dict.fromkeys(k for _, k in plain))
                self._bindings[module] = plain
            chunk_units = []
            for mp in chunked:
                for i, key in enumerate(mp.keys):
                    cu = f"{qual}#{i}"
                    self.units[cu] = (key,)
                    chunk_units.append((cu, key, mp.rows[i]))
            self._module_units[module] = (unit, chunked[0] if chunked else None, chunk_units)
        return self.units

    def _wrap(self, module, make) -> None:
        had = "forward" in module.__dict__
        self._forwards.append((module, had, module.__dict__.get("forward")))
        module.forward = make(module.forward)

    def install_forwards(self, model, shared) -> None:
        """Wrap each module's forward (and the root's, which brackets a pass) over ``shared``."""
        for module, (unit, chunked_mp, chunk_units) in self._module_units.items():
            if chunked_mp is not None and isinstance(module, nn.Linear):  # a head in row chunks
                self._wrap(module, lambda inner, m=chunked_mp, c=chunk_units:
                           chunked_linear_forward(shared, m, c, lambda m=m: shared.dense_copy(m)))
            elif chunked_mp is not None and plain_embedding(module):  # its only weight is in chunks
                self._wrap(module, lambda inner, m=chunked_mp, c=chunk_units:
                           chunked_embedding_forward(shared, m, c))
            elif chunked_mp is not None:  # its own forward runs; its F.embedding reads the chunks
                chunked_mp.row_lookup = row_lookup(shared, chunked_mp, chunk_units)
            elif unit is not None:
                def make(inner, u=unit, m=module, b=self._bindings[module]):
                    f = unit_forward(shared, u, b, inner)
                    return fused_forward(shared, m, b, f) if shared.fused is not None else f
                self._wrap(module, make)
        self._wrap(model, lambda inner: root_forward(shared, inner))

    def remove_forwards(self) -> None:
        """Every wrapped forward back as it was (an own ``forward`` attribute or none), newest first."""
        for module, had, old in reversed(self._forwards):
            if had:
                module.__dict__["forward"] = old
            else:
                module.__dict__.pop("forward", None)
        self._forwards.clear()
