"""A managed parameter: the same Parameter object, its class swapped to ``ManagedParameter``.

Why not a wrapper tensor subclass (torchao's pattern)? A wrapper needs a new Parameter object in
every module that owns the weight, so optimizers, tied weights and references a user took
before entry would all point at the old object. Swapping the class keeps identity: the object
``model.lm_head.weight`` is the same before, during and after the block. Its ``.data`` is a
*placeholder*: one NaN element expanded to the weight's shape (2 bytes of real storage, so no C++
path that bypasses Python can ever read freed memory), and ``__torch_function__`` sees every
Python-level op first:

* inside its module's forward (the thread that holds the pass) the parameter's data is the
  scheduler's dense slot and ops pass straight through;
* elsewhere a read decodes the weight on demand into a fresh tensor (exact values, nothing kept
  afterwards: the temporary lives only as long as what the op returns);
* metadata (shape, dtype, device, requires_grad, grad, hooks, ...) is answered without decoding;
* a write (an in-place op, ``out=`` into it, ``.data = ...``) raises ``ManagedError`` naming the
  parameter: the compressed weight is the truth while managed.

``p.data`` outside a forward returns a ``ManagedData`` view with the same rules, so
``p.data.mul_(2)`` is caught as well. Both classes pickle as dense tensors (``torch.save``).
"""
from __future__ import annotations

import threading
import weakref
from collections import OrderedDict

import torch
from torch import nn
from torch.utils._pytree import tree_map

from .errors import ManagedError

# id(tensor) -> (weakref to it, weakref to its _Param): which tensors stand for which managed
# parameter. Weak to the _Param too: a strong reference from this global would keep the
# handle, and through it the model, alive forever (from_pretrained models are freed by GC).
_LIVE: dict = {}


class _Gone:
    """What ``lookup`` returns for a tensor whose managed model was freed: inactive, so every
    read raises a clear error instead of computing with the placeholder."""

    active = False
    binds = 0

    def bound_here(self) -> bool:
        return False


_GONE = _Gone()
_LIVE_LOCK = threading.Lock()

_META_GETTERS = frozenset({
    "shape", "dtype", "device", "requires_grad", "is_leaf", "grad", "grad_fn", "ndim", "layout",
    "is_cuda", "is_cpu", "is_meta", "is_sparse", "is_quantized", "is_mkldnn", "is_nested", "names",
    "_version", "itemsize", "nbytes", "output_nr", "_cdata", "is_xpu", "is_mps", "is_mtia",
    "_backward_hooks", "_post_accumulate_grad_hooks", "is_sparse_csr", "_grad", "_grad_fn",
})
_META_SETTERS = frozenset({"grad", "requires_grad", "_grad", "_backward_hooks",
                           "_post_accumulate_grad_hooks", "names", "retains_grad"})
_META_METHODS = frozenset({
    "size", "dim", "numel", "nelement", "element_size", "get_device", "is_floating_point",
    "is_complex", "is_signed", "requires_grad_", "retain_grad", "register_hook",
    "register_post_accumulate_grad_hook", "__len__", "__hash__", "untyped_storage", "data_ptr",
    "is_pinned", "_is_view", "storage_offset", "is_inference",
})
_INPLACE_DUNDERS = frozenset({
    "__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__",
    "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__", "__imatmul__",
    "__setstate__",
})


def lookup(t):
    """The _Param a tensor stands for, or None."""
    e = _LIVE.get(id(t))
    if e is not None and e[0]() is t:
        mp = e[1]()
        return mp if mp is not None else _GONE
    return None


def register(t, mp) -> None:
    key = id(t)

    def gone(ref, key=key):
        with _LIVE_LOCK:
            if _LIVE.get(key, (None,))[0] is ref:
                del _LIVE[key]

    with _LIVE_LOCK:
        _LIVE[key] = (weakref.ref(t, gone), weakref.ref(mp))


def unregister(t) -> None:
    with _LIVE_LOCK:
        e = _LIVE.get(id(t))
        if e is not None and e[0]() is t:
            del _LIVE[id(t)]


def set_data(t, value) -> None:
    """``t.data = value`` past our own ``__torch_function__``."""
    with torch._C.DisableTorchFunctionSubclass():
        t.data = value


def make_placeholder(shape, dtype, device) -> torch.Tensor:
    """One NaN element, expanded: the weight's shape and dtype, 1 element of real storage."""
    with torch.inference_mode(False), torch.no_grad():
        one = torch.full((1,), float("nan"), dtype=dtype, device=device)
        return one.expand(tuple(shape)) if len(shape) else one.view(())


def _name_of(func) -> tuple[str, str]:
    """(kind, name): kind is "get"/"set" for properties, else "call"."""
    name = getattr(func, "__name__", "")
    if name in ("__get__", "__set__"):
        attr = getattr(getattr(func, "__self__", None), "__name__", "")
        return ("get" if name == "__get__" else "set"), attr
    return "call", name


def _is_write(name: str) -> bool:
    if name in _INPLACE_DUNDERS:
        return True
    return name.endswith("_") and not name.startswith("__") and name not in _META_METHODS


def _targets(args, kwargs):
    """The tensors an in-place op writes: its first argument (a list for foreach ops; given by
    keyword, e.g. ``torch.nn.init.normal_(tensor=w)``, any keyword argument) and out=."""
    out = []
    firsts = args[:1] if args else list(kwargs.values())
    for first in firsts:
        out.extend(first if isinstance(first, (list, tuple)) else [first])
    o = kwargs.get("out")
    if o is not None:
        out.extend(o if isinstance(o, (list, tuple)) else [o])
    return out


def _write_error(mp, what: str) -> ManagedError:
    return ManagedError(
        f"nzrt: {mp.names[0]!r} is compressed under nzrt.managed(); writing it ({what}) is not "
        f"supported inside the block. Leave the `with` block (the weight is restored), change it, "
        f"and enter again")


def _stale_error() -> ManagedError:
    return ManagedError("nzrt: this tensor came from a managed parameter's `.data` inside an "
                        "nzrt.managed() block that has ended, or from a managed model that was "
                        "released or garbage-collected; read the parameter again from a live model")


def _row_lookup(args, kwargs):
    """``F.embedding(ids, weight)`` on a weight kept in row chunks, outside a forward that bound
    it, without autograd through the weight: the rows from the chunks the ids fall in, never the
    whole table (an Embedding subclass with its own forward, e.g. Gemma3's scaled one)."""
    w = args[1] if len(args) > 1 else kwargs.get("weight")
    mp = lookup(w) if isinstance(w, torch.Tensor) else None
    if mp is None or not mp.active or getattr(mp, "row_lookup", None) is None or mp.bound_here():
        return None
    if kwargs.get("max_norm") is not None or (torch.is_grad_enabled() and mp.param.requires_grad):
        return None
    ids = args[0] if args else kwargs.get("input")
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
        return None
    return mp.row_lookup(ids)


def _torch_function(func, types, args, kwargs):
    kwargs = kwargs or {}
    if func is torch.nn.functional.embedding:
        rows = _row_lookup(args, kwargs)
        if rows is not None:
            return rows
    kind, name = _name_of(func)
    self_mp = lookup(args[0]) if args else None
    passthrough = False
    if kind == "get":
        if self_mp is not None and self_mp.active and name == "data" and not self_mp.bound_here():
            return data_view(self_mp)
        passthrough = name in _META_GETTERS
    elif kind == "set":
        if self_mp is not None and self_mp.active and name not in _META_SETTERS:
            raise _write_error(self_mp, f".{name} = ...")
        passthrough = True
    else:
        if _is_write(name) or "out" in kwargs:
            for t in _targets(args, kwargs):
                mp = lookup(t) if isinstance(t, torch.Tensor) else None
                if mp is not None and mp.active:
                    raise _write_error(mp, name)
        passthrough = name in _META_METHODS

    if passthrough:
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    dense: dict = {}

    def sub(x):
        if not isinstance(x, torch.Tensor):
            return x
        mp = lookup(x)
        if mp is None:
            return x
        if not mp.active:
            raise _stale_error()
        if mp.bound_here():  # inside its forward its data is the scheduler's dense slot: use as is
            return x
        if id(mp) not in dense:
            dense[id(mp)] = mp.dense_copy()
        return dense[id(mp)]

    args = tree_map(sub, args)
    kwargs = tree_map(sub, kwargs)
    with torch._C.DisableTorchFunctionSubclass():
        return func(*args, **kwargs)


class ManagedParameter(nn.Parameter):
    """The class of a parameter while it is managed (see the module docstring)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return _torch_function(func, types, args, kwargs)

    def _dense_for_copy(self) -> torch.Tensor:
        mp = lookup(self)
        if mp is None:
            with torch._C.DisableTorchFunctionSubclass():
                return self.data
        if not mp.active:
            raise _stale_error()
        return mp.dense_copy()

    def __reduce_ex__(self, proto):
        return (torch._utils._rebuild_parameter, (self._dense_for_copy(), self.requires_grad, OrderedDict()))

    def __deepcopy__(self, memo):
        if id(self) in memo:
            return memo[id(self)]
        result = nn.Parameter(self._dense_for_copy().clone(), self.requires_grad)
        memo[id(self)] = result
        return result


class ManagedData(torch.Tensor):
    """What ``p.data`` gives outside a forward: reads decode, writes raise (as for the parameter)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return _torch_function(func, types, args, kwargs)

    def __reduce_ex__(self, proto):
        mp = lookup(self)
        if mp is None or not mp.active:
            raise _stale_error()
        return mp.dense_copy().__reduce_ex__(proto)


def data_view(mp) -> torch.Tensor:
    with torch.inference_mode(False):
        v = torch.Tensor._make_subclass(ManagedData, mp.placeholder, False)
    register(v, mp)
    return v
