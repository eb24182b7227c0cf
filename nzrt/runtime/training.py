"""Training on compressed weights: one optimizer per parameter, stepped as its gradient is complete.

PyTorch's "optimizer step in backward" pattern (``register_post_accumulate_grad_hook``): when a
parameter's gradient has been accumulated (a tied weight: once, from the summed gradient), its
own optimizer steps and the gradient is freed, so no full set of gradients ever exists. For a
managed weight the step runs on a *shadow* parameter: the weight is decoded into it (exact), the
optimizer state is decoded beside it, the optimizer steps, and the new weight and state are
compressed again (lossless) before the dense copies are dropped. The arithmetic is the optimizer's
own on the same values, shapes and layout, so the run is bit-identical to plain PyTorch with the
same per-parameter optimizers in the backward.

``OptimizerConfig(in_backward=False)`` keeps the gradients instead (accumulation over
micro-batches, global-norm clipping): ``run.step()`` then applies each optimizer in turn, one
weight decoded at a time, and ``run.zero_grad()`` frees the gradients. It costs one dense
gradient per trainable weight until the step, as plain PyTorch does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .. import osmem
from ..format import CompressedTensor
from .errors import ManagedError
from .params import FLOATS, find_params
from .shard_tensor import ShardWeight
from .transaction import deferred_interrupts
from .weight import lookup, make_placeholder, set_data


@dataclass(frozen=True)
class OptimizerConfig:
    """How ``nzrt.managed(model, optimizer=...)`` trains.

    factory: takes a list of parameters, returns a ``torch.optim.Optimizer`` (e.g.
        ``functools.partial(torch.optim.AdamW, lr=1e-4)``); called once per trainable parameter.
    in_backward: step each parameter's optimizer as soon as its gradient is complete (the
        gradient is freed at once). False: gradients are kept; call ``run.step()`` and
        ``run.zero_grad()`` (for gradient accumulation and global-norm clipping).
    compress_states: keep optimizer state tensors (AdamW's ``exp_avg``, ``exp_avg_sq``,
        momentum buffers) compressed losslessly between steps.
    malloc_mmap_threshold: on the CPU, from entry on, glibc gives every block of at least this
        many bytes its own memory map (``mallopt(M_MMAP_THRESHOLD)``), so the dense temporaries
        of each step leave the process when freed instead of staying in malloc's arenas (+0.8 to
        1.2 GiB of RSS at 0.4B parameters otherwise). Process-wide, and glibc's own adaptive
        threshold stays off afterwards. None: malloc is left as it is.
    """

    factory: Callable
    in_backward: bool = True
    compress_states: bool = True
    malloc_mmap_threshold: int | None = 64 << 10

    def __post_init__(self):
        if not callable(self.factory):
            raise TypeError(f"optimizer must be a callable taking a list of parameters and returning a "
                            f"torch.optim.Optimizer (e.g. functools.partial(torch.optim.AdamW, lr=1e-4)), "
                            f"got {type(self.factory).__name__}")
        for name in ("in_backward", "compress_states"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"OptimizerConfig.{name} must be a bool, got {getattr(self, name)!r}")
        t = self.malloc_mmap_threshold
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < 4096):
            raise ValueError(f"OptimizerConfig.malloc_mmap_threshold must be None or an int of at least "
                             f"4096 bytes, got {t!r}")


def as_config(optimizer) -> OptimizerConfig | None:
    if optimizer is None or isinstance(optimizer, OptimizerConfig):
        return optimizer
    return OptimizerConfig(optimizer)


# Optimizers whose update of an element depends only on that element (and per-tensor scalars
# such as the step count): stepping a weight in row chunks, each with its own optimizer and state,
# is then the same arithmetic as stepping it whole. Exact classes only (a subclass may differ).
ELEMENTWISE = (torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD, torch.optim.Adagrad,
               torch.optim.RMSprop, torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam)
CHUNK_STEP_BYTES = 16 << 20   # weights from this size are stepped in row chunks ...
STEP_CHUNK_BYTES = 2 << 20    # ... of about this size: one chunk's state decoded at a time


class _Entry:
    """One optimizer: of a whole parameter, or of rows ``rows`` of a managed weight."""

    __slots__ = ("name", "param", "mp", "shadow", "blank", "opt", "packed", "rows")

    def __init__(self, name, param, mp, shadow, opt, rows=None):
        self.name = name
        self.param = param
        self.mp = mp              # the runtime's Param, or None for a parameter left dense
        self.shadow = shadow      # the Parameter the optimizer steps (managed weights only)
        self.blank = shadow.data if shadow is not None else None  # its data between steps
        self.opt = opt
        self.packed: dict = {}    # state name -> CompressedTensor between steps
        self.rows = rows          # (first, end) row of a chunk, or None for the whole parameter


class _Group:
    """A trainable parameter and its optimizer(s), stepped together from its hook."""

    __slots__ = ("param", "mp", "entries", "hook")

    def __init__(self, param, mp, entries):
        self.param = param
        self.mp = mp
        self.entries = entries
        self.hook = None


def _shadow(shape, mp) -> nn.Parameter:
    """The parameter a managed weight's optimizer steps: between steps a 1-element placeholder
    of the right shape; during a step it views the decoded weight (or rows of it)."""
    device = mp.device if isinstance(mp, ShardWeight) else mp.placeholder.device
    with torch.no_grad():
        return nn.Parameter(make_placeholder(shape, mp.dtype, device), requires_grad=True)


def _step_spans(shape, itemsize, opt) -> list:
    """Row spans for a chunked step, or [] to step the weight whole."""
    nbytes = itemsize
    for d in shape:
        nbytes *= d
    if type(opt) not in ELEMENTWISE or len(shape) < 2 or nbytes < CHUNK_STEP_BYTES:
        return []
    rows = max(1, STEP_CHUNK_BYTES // (nbytes // shape[0]))
    return [(a, min(a + rows, shape[0])) for a in range(0, shape[0], rows)]


class Trainer:
    """The per-parameter optimizers of one managed run (built at entry, dropped at exit)."""

    def __init__(self, shared, model, config: OptimizerConfig, min_numel: int):
        """``shared``: the block's shared state (``nzrt.runtime.shared``): its lock, device,
        decoder and ``update_weight``; ``min_numel``: smaller optimizer states stay dense."""
        self.shared = shared
        self.model = model
        self.min_numel = min_numel
        self.config = config
        self.entries: dict = {}   # name -> _Entry (a tied weight: under its first name)
        self._by_param: dict = {}  # id(parameter) -> _Entry
        self.steps = 0
        self.schedulers = None    # LRSchedulers, once lr_scheduler() was called
        self.final = None         # summary() as of the exit
        # (Param, version, dense): the weight the backward decoded last, for its step to reuse
        # (a weight's AccumulateGrad runs right after the node that unpacked it); one at most
        self._unpacked = None

    # -- building -------------------------------------------------------------------------------
    def _optimizer(self, target):
        opt = self.config.factory([target])
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"optimizer factory returned a {type(opt).__name__}, not a torch.optim.Optimizer")
        return opt

    def attach(self) -> None:
        if self.config.malloc_mmap_threshold is not None and self.shared.device.type == "cpu":
            osmem.set_mmap_threshold(self.config.malloc_mmap_threshold)
        for p, names, _ in find_params(self.model):
            if not p.requires_grad:
                continue
            mp = lookup(p)
            if mp is None and self.shared.sharded is not None:
                mp = self.shared.sharded.get(p)  # an FSDP2 parameter's compressed local shard
            if mp is None:
                entries = [_Entry(names[0], p, None, None, self._optimizer(p))]
            else:
                shadow = _shadow(mp.shape, mp)
                opt = self._optimizer(shadow)  # its class says whether row chunks step alike
                spans = _step_spans(mp.shape, p.element_size(), opt)
                entries = [_Entry(names[0], p, mp, shadow, opt)]
                if spans:  # a large weight, an elementwise optimizer: one per row chunk
                    entries = []
                    for a, b in spans:
                        sh = _shadow((b - a,) + tuple(mp.shape[1:]), mp)
                        entries.append(_Entry(f"{names[0]}[{a}:{b}]", p, mp, sh, self._optimizer(sh), (a, b)))
            g = _Group(p, mp, entries)
            for e in entries:
                self.entries[e.name] = e
            self._by_param[id(p)] = g
        if self.config.in_backward:
            for g in self._by_param.values():
                g.hook = g.param.register_post_accumulate_grad_hook(self._hook)

    def remember_unpacked(self, mp, dense) -> None:
        g = self._by_param.get(id(mp.param))
        self._unpacked = (mp, mp.version, dense) if g is not None and self.config.in_backward else None

    def detach(self) -> None:
        """At exit, before the weights are restored: hooks off, and the optimizer states freed
        (they would sit beside the dense weights; ``run.state_dict()`` is for inside the block)."""
        self._unpacked = None
        for g in self._by_param.values():
            if g.hook is not None:
                g.hook.remove()
                g.hook = None
        self.final = self.summary()  # the exit report's line, as the states were
        for e in self.entries.values():
            e.packed = {}
            e.opt.state.clear()

    @property
    def optimizers(self) -> dict:
        return {n: e.opt for n, e in self.entries.items()}

    # -- stepping -------------------------------------------------------------------------------
    def _hook(self, p) -> None:
        g = self._by_param.get(id(p))
        if g is not None:
            self.step_one(g)

    def step_all(self) -> None:
        for g in self._by_param.values():
            if g.param.grad is not None:
                self.step_one(g)

    def zero_grad(self) -> None:
        for g in self._by_param.values():
            g.param.grad = None

    def step_one(self, g: _Group) -> None:
        with self.shared.lock:
            if g.mp is None:
                (e,) = g.entries
                e.opt.step()
                e.opt.zero_grad(set_to_none=True)
                return
            mp = g.mp
            if not mp.active:
                raise ManagedError(f"nzrt: {mp.names[0]!r} is no longer managed (the block has ended)")
            grad = g.param.grad
            if isinstance(mp, ShardWeight):  # FSDP2's reduce-scattered gradient: a DTensor of the shard
                grad = grad._local_tensor
            cached, self._unpacked = self._unpacked, None
            if cached is not None and cached[0] is mp and cached[1] == mp.version:
                dense = cached[2]            # decoded by the backward just now (its node is done)
            else:
                dense = mp.dense_copy()      # the weight, exact: [shape] of its dtype
            del cached
            # one weight's step is whole or not at all: Ctrl-C waits until its new weight and
            # state are stored (a KeyboardInterrupt is raised right after)
            with deferred_interrupts():
                for e in g.entries:  # the whole weight, or its row chunks in turn (views)
                    a, b = e.rows if e.rows is not None else (None, None)
                    set_data(e.shadow, dense[a:b] if e.rows is not None else dense)
                    e.shadow.grad = grad[a:b] if e.rows is not None else grad
                    try:
                        self._unpack_state(e)
                        e.opt.step()
                        e.shadow.grad = None
                        self._pack_state(e)
                    finally:
                        e.shadow.grad = None
                        set_data(e.shadow, e.blank)
                g.param.grad = None
                del grad
                if isinstance(mp, ShardWeight):
                    mp.store(dense)
                else:
                    self.shared.update_weight(mp, dense)
            self.steps += 1

    # -- optimizer state ------------------------------------------------------------------------
    def _state_of(self, e) -> dict:
        return e.opt.state[e.shadow if e.shadow is not None else e.param]

    def _unpack_state(self, e) -> None:
        if not e.packed:
            return
        st = self._state_of(e)
        for name, ct in e.packed.items():
            st[name] = self.shared.decoder.decompress(ct)
        e.packed = {}

    def _pack_state(self, e) -> None:
        if e.mp is None or not self.config.compress_states:  # a dense parameter's state stays dense
            return
        st = self._state_of(e)
        for name, v in list(st.items()):
            if isinstance(v, CompressedTensor):  # loaded from a state_dict as it was saved
                e.packed[name] = v
                del st[name]
            elif isinstance(v, torch.Tensor) and v.dtype in FLOATS and v.numel() >= self.min_numel:
                ct = self.shared.decoder.compress_lossless(v)
                e.packed[name] = ct
                del st[name]

    def state_bytes(self) -> tuple[int, int]:
        """(compressed bytes, dense bytes) of the optimizer states held now."""
        comp = dense = 0
        for e in self.entries.values():
            comp += sum(ct.nbytes for ct in e.packed.values())
            for v in e.opt.state.get(e.shadow if e.shadow is not None else e.param, {}).values():
                if isinstance(v, torch.Tensor):
                    dense += v.numel() * v.element_size()
        return comp, dense

    def summary(self) -> str:
        """One line for the report: optimizers, steps, what the states take."""
        if self.final is not None:
            return self.final
        from ..budget import format_bytes
        comp, dense = self.state_bytes()
        packed_dense = sum(ct.numel() * ct.dtype.itemsize for e in self.entries.values() for ct in e.packed.values())
        kinds = sorted({type(e.opt).__name__ for e in self.entries.values()})
        ratio = f" ({100 * comp / packed_dense:.1f}%)" if packed_dense else ""
        return (f"training: {len(self.entries)} optimizers ({', '.join(kinds) or '-'}), "
                f"{'in the backward' if self.config.in_backward else 'run.step()'}, {self.steps} steps; "
                f"states {format_bytes(packed_dense)} -> {format_bytes(comp)} compressed{ratio}, "
                f"{format_bytes(dense)} dense")

    # -- saving and resuming --------------------------------------------------------------------
    def state_dict(self) -> dict:
        """{"optimizers": {name: optimizer state_dict}, "lr_schedulers": ...}; compressed states
        as CompressedTensor (no dense copy; ``torch.save`` pickles them)."""
        out = {}
        with self.shared.lock:
            for n, e in self.entries.items():
                sd = e.opt.state_dict()
                if e.packed:
                    st = sd["state"].setdefault(0, {})
                    st.update(e.packed)
                out[n] = sd
        return {"optimizers": out, "lr_schedulers": self.schedulers.state_dict() if self.schedulers else None}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or "optimizers" not in state:
            raise ManagedError("expected a dict from run.state_dict() (with an 'optimizers' entry)")
        if state.get("lr_schedulers") is not None:
            if self.schedulers is None:
                raise ManagedError("this state_dict has LR scheduler states: call run.lr_scheduler(...) "
                                   "before run.load_state_dict(...)")
            self.schedulers.load_state_dict(state["lr_schedulers"])
        self._load_optimizers(state["optimizers"])

    def _load_optimizers(self, sd: dict) -> None:
        missing = set(self.entries) - set(sd)
        extra = set(sd) - set(self.entries)
        if missing or extra:
            raise ManagedError(f"optimizer state_dict does not match this model's trainable parameters: "
                               f"missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}")
        with self.shared.lock:
            for n, e in self.entries.items():
                st = sd[n].get("state", {}).get(0, {})
                packed = {k: v for k, v in st.items() if isinstance(v, CompressedTensor)}
                for k, ct in packed.items():
                    ref = tuple(e.shadow.shape) if e.shadow is not None else tuple(e.param.shape)
                    if tuple(ct.shape) != tuple(ref):
                        raise ManagedError(f"optimizer state {k!r} of {n!r} has shape {tuple(ct.shape)}, "
                                           f"the parameter {tuple(ref)}")
                plain = dict(sd[n], state={0: {k: v for k, v in st.items() if k not in packed}}
                             if st else sd[n].get("state", {}))
                e.opt.load_state_dict(plain)
                e.packed = dict(packed)
                if e.mp is None:  # a dense parameter keeps its state dense
                    self._unpack_state(e)
                self._pack_state(e)

    # -- learning-rate schedulers ---------------------------------------------------------------
    def lr_scheduler(self, factory) -> "LRSchedulers":
        scheds = {}
        for n, e in self.entries.items():
            sch = factory(e.opt)
            if not hasattr(sch, "step") or not hasattr(sch, "state_dict"):
                raise TypeError(f"lr_scheduler factory returned a {type(sch).__name__}, not an LR scheduler")
            scheds[n] = sch
        self.schedulers = LRSchedulers(scheds)
        return self.schedulers


class LRSchedulers:
    """The LR schedulers of all per-parameter optimizers, stepped together."""

    def __init__(self, schedulers: dict):
        self.schedulers = schedulers

    def step(self) -> None:
        for s in self.schedulers.values():
            s.step()

    def get_last_lr(self) -> dict:
        return {n: s.get_last_lr() for n, s in self.schedulers.items()}

    def state_dict(self) -> dict:
        return {n: s.state_dict() for n, s in self.schedulers.items()}

    def load_state_dict(self, sd: dict) -> None:
        if set(sd) != set(self.schedulers):
            raise ManagedError("LR scheduler state_dict does not match this run's parameters")
        for n, s in self.schedulers.items():
            s.load_state_dict(sd[n])
