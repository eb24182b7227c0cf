"""``nzrt.managed(model)``: keep a model's weights compressed and decode each layer just in time.

    with nzrt.managed(model, budget="6GiB", policy="auto") as run:
        out = model.generate(**inputs)
    print(run.report())

On entry every floating-point parameter of at least ``min_numel`` elements (bf16, fp16, fp32;
Linear, Embedding, Conv, norms, the output head; tied weights once) is compressed and its dense
storage freed. A forward pre-hook on each module that owns such a parameter makes its weights
dense just before it runs; a forward hook releases them (or keeps them, as the plan says).
Large plain ``nn.Embedding`` / ``nn.Linear`` weights (tied output heads included) are split
into row chunks, each decoded just before its part of the lookup / matmul, so no dense copy of a
whole vocabulary table is ever needed (exact: the lookup copies rows; on the CPU the chunked
matmul is bit-identical, on CUDA chunking is limited to embeddings).

While managed, a compressed parameter keeps its shape, dtype and device but holds no storage
outside its module's forward: reading it elsewhere raises "... data is not allocated yet".
On exit (also on an exception) every parameter is restored bit for bit (lossy mode keeps a
lossless copy in host memory for that), with its device and dtype; all hooks and forward
overrides are removed.

Models without weights in memory: build the model on the meta device (e.g. accelerate's
``init_empty_weights()``, which keeps buffers real) and pass ``weights=`` a mapping of parameter
(or buffer) name -> CompressedTensor or tensor, e.g. ``nzrt.load("model.nzrt")``. Meta
parameters are filled from it for the duration of the block and are meta again afterwards, so
the checkpoint is never dense as a whole.

``budget``: bytes on the execution device for the model's weights (compressed blobs, the dense
working set, and the parameters and buffers left uncompressed). Bytes, "6GiB", or "80%" of the
memory free at entry. Host memory used for host-tier weights and for lossy restore copies is not
counted when the device is a GPU; on the CPU the host is the device and everything counts.
"""
from __future__ import annotations

import os
import sys
import threading
import time
import warnings
import weakref

import torch
from torch import nn

from . import codec
from .budget import format_bytes, parse_budget
from .format import CompressedTensor
from .memory import MemoryTracker, storage_bytes
from .policies import BudgetError, Costs, LayerInfo, Offload, Resident, Tier, get_policy
from .report import LayerReport, Report
from .scheduler import Scheduler, TensorSlot

__all__ = ["managed", "Managed", "BudgetError", "ManagedError"]

_FLOATS = (torch.bfloat16, torch.float16, torch.float32)
_REGISTRY: "weakref.WeakKeyDictionary[nn.Module, Managed]" = weakref.WeakKeyDictionary()
DEFAULT_MIN_NUMEL = 2048
DEFAULT_CHUNK_BYTES = 2 << 20


class ManagedError(RuntimeError):
    """Misuse of ``managed`` (entered twice, a missing weight, ...)."""


class _Storageless(torch.Tensor):
    """Only used to build a tensor with a shape, dtype and device but no storage."""

    @staticmethod
    def __new__(cls, shape, dtype, device):
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=device,
                                                   requires_grad=False)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._has_compatible_shallow_copy_type.default:
            return True  # asked by `param.data = placeholder` under inference_mode
        raise RuntimeError("nzrt: this parameter is compressed; it is dense only inside its module's forward")


def _placeholder(shape, dtype, device) -> torch.Tensor:
    return _Storageless(tuple(shape), dtype, device)


def _unit_name(qualname: str) -> str:
    return qualname or "<root>"


class _Param:
    """A managed parameter: its compressed chunks and how to restore it."""

    __slots__ = ("param", "names", "shape", "dtype", "orig_device", "was_meta", "keys", "rows",
                 "restore_keys", "chunked", "owners", "binds", "placeholder")

    def __init__(self, param, names, owners):
        self.param = param
        self.names = names          # every name it has in the model (tied weights: several)
        self.owners = owners        # [(module, attribute name)]
        self.shape = tuple(param.shape)
        self.dtype = param.dtype
        self.orig_device = param.device
        self.was_meta = param.device.type == "meta"
        self.keys: list = []        # tensor keys of its chunks (one key when not chunked)
        self.rows: list = []        # (start, stop) rows of each chunk
        self.restore_keys: list = []
        self.chunked = False
        self.binds = 0
        self.placeholder = None


class Managed:
    """The handle ``nzrt.managed`` returns; a context manager (``attach``/``detach`` by hand work too)."""

    def __init__(self, model: nn.Module, *, policy="auto", budget=None, mantissa_bits=None, device=None,
                 weights=None, prefetch: bool = True, min_numel: int = DEFAULT_MIN_NUMEL,
                 chunk_bytes: int | None = DEFAULT_CHUNK_BYTES, backend: str | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"managed() takes a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.policy = get_policy(policy)
        self._budget_arg = budget
        self.mantissa_bits = mantissa_bits
        self._device_arg = device
        self.weights = weights
        self.prefetch = prefetch
        self.min_numel = int(min_numel)
        self.chunk_bytes = chunk_bytes
        self.backend = backend
        self.attached = False
        self._reset()

    def _reset(self):
        self.params: list = []
        self.tensors: dict = {}       # key -> TensorSlot
        self.restore: dict = {}       # key -> lossless CompressedTensor (lossy mode only)
        self.units: dict = {}         # unit -> tuple of keys
        self.unit_module: dict = {}
        self._handles: list = []
        self._forwards: list = []     # (module, had own forward attr, old value)
        self._moved: list = []        # (kind, module, name, original tensor)
        self._bindings: dict = {}     # module -> [(_Param, key)]
        self.scheduler = None
        self.tracker = None
        self.budget = None
        self.fixed_bytes = 0
        self.entry_seconds = 0.0
        self._layers: dict = {}
        self._warnings: list = []
        self._tier_now: dict = {}

    # -- context manager --------------------------------------------------------------------
    def __enter__(self) -> "Managed":
        self.attach()
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    # -- attach -----------------------------------------------------------------------------
    def attach(self) -> "Managed":
        if self.attached:
            raise ManagedError("this managed() handle is already entered")
        for m in self.model.modules():
            if m in _REGISTRY:
                raise ManagedError("this model (or a module inside it) is already under nzrt.managed(); "
                                   "leave the first `with` block before entering another")
        for m, owner in list(_REGISTRY.items()):
            if any(sub is self.model for sub in m.modules()):
                raise ManagedError("a module containing this model is already under nzrt.managed()")
        t0 = time.perf_counter()
        self._reset()
        _REGISTRY[self.model] = self
        self.attached = True
        try:
            self._attach()
        except BaseException:
            self.detach()
            raise
        self.entry_seconds = time.perf_counter() - t0
        return self

    def _resolve_device(self) -> torch.device:
        if self._device_arg is not None:
            dev = torch.device(self._device_arg)
        else:
            dev = None
            for t in list(self.model.parameters()) + list(self.model.buffers()):
                if t.device.type != "meta":
                    dev = t.device
                    break
            dev = dev or torch.device("cpu")
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev.type not in ("cpu", "cuda"):
            raise ManagedError(f"nzrt runs models on 'cpu' or 'cuda', not {dev}")
        return dev

    def _attach(self) -> None:
        model = self.model
        self.device = dev = self._resolve_device()
        self.tracker = MemoryTracker(dev)
        weights = dict(self.weights) if self.weights is not None else {}
        used_weights = set()

        # every parameter once, with all its names and owners (tied weights)
        by_id: dict = {}
        for mname, module in model.named_modules(remove_duplicate=False):
            for pname, p in module.named_parameters(recurse=False):
                full = f"{mname}.{pname}" if mname else pname
                entry = by_id.setdefault(id(p), (p, [], []))
                if full not in entry[1]:
                    entry[1].append(full)
                if not any(o[0] is module and o[1] == pname for o in entry[2]):
                    entry[2].append((module, pname))

        # buffers: meta ones from the weights, others moved to the device if needed
        for mname, module in model.named_modules():
            for bname, b in list(module._buffers.items()):
                if b is None:
                    continue
                full = f"{mname}.{bname}" if mname else bname
                if b.device.type == "meta":
                    src = weights.get(full)
                    if src is None:
                        raise ManagedError(f"buffer {full!r} is on the meta device and `weights` has no "
                                           f"entry for it (build the model with buffers on a real device, "
                                           f"e.g. accelerate's init_empty_weights())")
                    used_weights.add(full)
                    new = _dense_from(src, b, dev, full)
                elif b.device != dev:
                    new = b.to(dev)
                else:
                    continue
                self._moved.append(("buffer", module, bname, b))
                module._buffers[bname] = new

        for p, names, owners in by_id.values():
            src_name = next((n for n in names if n in weights), None)
            is_meta = p.device.type == "meta"
            if src_name is not None and not is_meta:
                raise ManagedError(f"`weights` has an entry for {src_name!r}, but that parameter already "
                                   f"holds data; `weights` fills parameters on the meta device only")
            if is_meta and src_name is None:
                raise ManagedError(f"parameter {names[0]!r} is on the meta device and `weights` has no "
                                   f"entry for it")
            src = weights[src_name] if src_name is not None else None
            if src_name is not None:
                used_weights.add(src_name)
            compressible = p.dtype in _FLOATS and p.numel() >= self.min_numel
            if isinstance(src, CompressedTensor):
                if tuple(src.shape) != tuple(p.shape) or src.dtype != p.dtype:
                    raise ManagedError(f"weights[{src_name!r}] is {src.dtype} {tuple(src.shape)}, the "
                                       f"parameter is {p.dtype} {tuple(p.shape)}")
                compressible = True
            if is_meta:
                # a meta parameter cannot take data of another device in place: a new Parameter
                # stands in for it in every module that owns it, the meta one comes back on exit
                stand_in = nn.Parameter(torch.empty(0, dtype=p.dtype, device=dev), requires_grad=p.requires_grad)
                stand_in.data = _placeholder(p.shape, p.dtype, dev)
                self._moved.append(("swap", owners, None, p))
                for module, pname in owners:
                    module._parameters[pname] = stand_in
                p = stand_in
            if not compressible:
                if is_meta:
                    p.data = _dense_from(src, p, dev, src_name)
                    continue
                elif p.device != dev:
                    new = p.data.to(dev)
                else:
                    continue
                self._moved.append(("param", p, None, p.data))
                p.data = new
                continue
            self._compress_param(p, names, owners, src, was_meta=is_meta)

        unused = set(weights) - used_weights
        if unused and self.weights is not None:
            self._warnings.append(f"{len(unused)} entries of `weights` name no meta parameter or buffer "
                                  f"and were ignored, e.g. {sorted(unused)[:3]}")

        self._build_units()
        self._install_hooks()

        # budget
        self.fixed_bytes = self._fixed_bytes()
        self.budget = parse_budget(self._budget_arg, lambda: self.tracker.free_bytes())
        self._layers = self._layer_infos()
        costs = self._costs({})
        unit_budget = None if self.budget is None else self.budget - self.fixed_bytes
        try:
            if unit_budget is not None and unit_budget <= 0:
                raise BudgetError("fixed bytes exceed the budget", 0)
            initial = self.policy.plan((), self._layers, unit_budget, costs)
        except BudgetError as e:
            smallest = self._smallest_budget(costs)
            raise BudgetError(
                f"budget {format_bytes(self.budget)} ({self.budget} bytes) is too small for this model "
                f"under policy {getattr(self.policy, 'name', self.policy)!s}: the smallest budget that works is "
                f"{format_bytes(smallest)} ({smallest} bytes) "
                f"(compressed weights, the largest layer decoded, and {format_bytes(self.fixed_bytes)} of "
                f"uncompressed parameters and buffers)", smallest) from None

        threads = os.environ.get("NZRT_DECODE_THREADS")  # numba threads of the CPU decode worker
        self.scheduler = Scheduler(self.units, self.tensors, dev, planner=self._planner, place=self._place,
                                   decode=self._decode, prefetch=self.prefetch,
                                   decode_threads=int(threads) if threads else None)
        self._place(initial)
        self.scheduler.plan = initial
        self.tracker.sample()

    def _decode(self, ct, buf):
        if _serial_decode():
            with _DECODE_LOCK:
                codec.decode_into(ct, buf, backend=self.backend)
        else:
            codec.decode_into(ct, buf, backend=self.backend)

    def _chunkable(self, p, owners) -> bool:
        if not self.chunk_bytes or p.dim() != 2:
            return False
        if p.numel() * p.element_size() <= self.chunk_bytes:
            return False
        for module, name in owners:
            if name != "weight":
                return False
            if type(module).forward is nn.Embedding.forward and isinstance(module, nn.Embedding):
                if module.max_norm is not None:
                    return False
            elif type(module).forward is nn.Linear.forward and isinstance(module, nn.Linear):
                if self.device.type != "cpu":
                    return False  # cuBLAS may pick other kernels for other widths: not exact
            else:
                return False
            if "forward" in module.__dict__:
                return False
        return True

    def _compress_param(self, p, names, owners, src, was_meta=False) -> None:
        mp = _Param(p, names, owners)
        mp.was_meta = was_meta
        self.params.append(mp)
        dev = self.device
        lossy = self.mantissa_bits is not None
        base = names[0]
        chunked = self._chunkable(p, owners)
        if src is not None:  # already compressed (from a checkpoint)
            dense_src = None
            if chunked:
                dense_src = codec.decompress(src.to("cpu") if src.device.type != "cpu" else src,
                                             backend=self.backend)
            cts = [(src, (0, p.shape[0] if p.dim() else 0))] if not chunked else None
        else:
            dense_src = p.detach()
            cts = None
        if chunked:
            row_bytes = p.shape[1] * p.element_size()
            # whole multiples of 256 rows: CPU GEMMs then compute every output column as the
            # full-width call does (checked bit for bit on fp32/bf16/fp16 shapes in the tests;
            # odd widths are not safe)
            rows = max(256, self.chunk_bytes // row_bytes // 256 * 256)
            spans = [(a, min(a + rows, p.shape[0])) for a in range(0, p.shape[0], rows)]
        else:
            spans = [(0, p.shape[0] if p.dim() else 0)]
        mp.chunked = chunked
        for i, (a, b) in enumerate(spans):
            key = f"{base}#{i}" if chunked else base
            if cts is not None:
                # given by the caller (e.g. nzrt.load's memory map): the "disk" tier streams
                # from these bytes where they are
                ct = cts[0][0]
                on_disk = ct.device.type == "cpu" or _is_mapped(ct)
            else:
                part = dense_src[a:b] if chunked else dense_src
                ct = codec.compress(part, mantissa_bits=self.mantissa_bits, backend=self._cbackend(part))
                on_disk = False
                if lossy and not mp.was_meta:
                    rct = codec.compress(part, backend=self._cbackend(part))
                    self.restore[key] = rct.to("cpu") if rct.device.type != "cpu" else rct
            ct.verify()
            shape = tuple(ct.shape)
            self.tensors[key] = TensorSlot(key=key, ct=ct, shape=shape, dtype=ct.dtype,
                                           numel=ct.numel(), home=ct, on_disk=on_disk)
            mp.keys.append(key)
            mp.rows.append((a, b))
        # free the dense original: the parameter keeps shape/dtype, moves to the device, holds nothing
        mp.placeholder = _placeholder(mp.shape, mp.dtype, dev)
        p.data = mp.placeholder

    def _cbackend(self, t):
        return self.backend if self.backend is not None or t.device.type != "cuda" else None

    def _build_units(self) -> None:
        by_module: dict = {}
        names = {id(m): n for n, m in self.model.named_modules(remove_duplicate=False)}
        for mp in self.params:
            for module, pname in mp.owners:
                by_module.setdefault(module, []).append((mp, pname))
        self._module_units: dict = {}
        for module, entries in by_module.items():
            qual = _unit_name(names.get(id(module), type(module).__name__))
            plain = [(mp, mp.keys[0]) for mp, _ in entries if not mp.chunked]
            chunked = [mp for mp, _ in entries if mp.chunked]
            unit = None
            if plain:
                unit = qual
                self.units[unit] = tuple(dict.fromkeys(k for _, k in plain))
                self.unit_module[unit] = module
                self._bindings[module] = plain
            chunk_units = []
            for mp in chunked:
                for i, key in enumerate(mp.keys):
                    cu = f"{qual}#{i}"
                    self.units[cu] = (key,)
                    self.unit_module[cu] = module
                    chunk_units.append((cu, key, mp.rows[i]))
            self._module_units[module] = (unit, chunked[0] if chunked else None, chunk_units)

    def _install_hooks(self) -> None:
        for module, (unit, chunked_param, chunk_units) in self._module_units.items():
            if unit is not None:
                self._handles.append(module.register_forward_pre_hook(self._make_pre(module, unit)))
                self._handles.append(module.register_forward_hook(self._make_post(module, unit),
                                                                  always_call=True))
            if chunked_param is not None:
                had = "forward" in module.__dict__
                self._forwards.append((module, had, module.__dict__.get("forward")))
                if isinstance(module, nn.Embedding):
                    module.forward = self._embedding_forward(module, chunked_param, chunk_units)
                else:
                    module.forward = self._linear_forward(module, chunked_param, chunk_units)
        self._handles.append(self.model.register_forward_pre_hook(self._root_pre, prepend=True))
        self._handles.append(self.model.register_forward_hook(self._root_post, always_call=True))

    # -- hooks ------------------------------------------------------------------------------
    def _root_pre(self, module, args):
        self.scheduler.begin_pass()

    def _root_post(self, module, args, output):
        ok = sys.exc_info()[1] is None
        self.scheduler.end_pass(ok)
        if self.scheduler.depth == 0:
            self.tracker.sample()

    def _make_pre(self, module, unit):
        sched = self.scheduler_ref
        bindings = self._bindings[module]

        def pre(mod, args):
            if torch.is_grad_enabled():
                _no_grad_check(bindings, args)
            bufs = sched().enter(unit)
            for mp, key in bindings:
                if mp.binds == 0:
                    mp.param.data = bufs[key].view(mp.shape)
                mp.binds += 1
        return pre

    def _make_post(self, module, unit):
        sched = self.scheduler_ref
        bindings = self._bindings[module]

        def post(mod, args, output):
            for mp, key in bindings:
                mp.binds -= 1
                if mp.binds <= 0:
                    mp.binds = 0
                    mp.param.data = mp.placeholder
            sched().exit(unit)
        return post

    def scheduler_ref(self):
        return self.scheduler

    def _embedding_forward(self, module, mp, chunk_units):
        sched = self.scheduler_ref
        num, dim = mp.shape

        def forward(input):
            if torch.is_grad_enabled():
                _no_grad_check([(mp, None)], (input,))
            s = sched()
            flat = input.reshape(-1)
            if flat.numel() and (bool((flat < 0).any()) or bool((flat >= num).any())):
                raise IndexError("index out of range in self")
            out = torch.empty((flat.numel(), dim), dtype=mp.dtype, device=flat.device)
            # only the chunks the ids hit are decoded (one token: one chunk); which ones depends
            # on the data, so these units stay out of the trace and are decoded on demand
            # (a tied output head prefetches the same chunks and shares them)
            chunk_of = torch.div(flat, chunk_units[0][2][1], rounding_mode="floor")
            hit = torch.unique(chunk_of).tolist() if flat.numel() else []
            for c in hit:
                unit, key, (a, b) = chunk_units[c]
                bufs = s.enter(unit, traced=False)
                try:
                    sel = (chunk_of == c).nonzero().squeeze(1)
                    w = bufs[key].view(b - a, dim)
                    out.index_copy_(0, sel, w.index_select(0, flat.index_select(0, sel) - a))
                finally:
                    s.exit(unit)
            return out.view(*input.shape, dim)
        return forward

    def _linear_forward(self, module, mp, chunk_units):
        sched = self.scheduler_ref
        n_out, n_in = mp.shape
        F = torch.nn.functional

        def forward(input):
            if torch.is_grad_enabled():
                _no_grad_check([(mp, None)], (input,))
            s = sched()
            bias = module.bias
            out = None
            for unit, key, (a, b) in chunk_units:
                bufs = s.enter(unit)
                try:
                    w = bufs[key].view(b - a, n_in)
                    y = F.linear(input, w, None if bias is None else bias[a:b])
                    if out is None:
                        out = torch.empty(input.shape[:-1] + (n_out,), dtype=y.dtype, device=y.device)
                    out[..., a:b] = y
                finally:
                    s.exit(unit)
            return out
        return forward

    # -- planning ---------------------------------------------------------------------------
    def _fixed_bytes(self) -> int:
        managed = {id(mp.param) for mp in self.params}
        tensors = [p for p in self.model.parameters() if id(p) not in managed]
        tensors += list(self.model.buffers())
        return storage_bytes(t for t in tensors if t.device == self.device)

    def _layer_infos(self) -> dict:
        out = {}
        seen_keys: set = set()
        for unit, keys in self.units.items():
            dense = sum(self.tensors[k].dense_bytes for k in keys)
            comp = 0
            for k in keys:
                if k not in seen_keys:  # tied tensors: the compressed bytes count once
                    comp += self.tensors[k].ct.nbytes
                    seen_keys.add(k)
            on_disk = all(self.tensors[k].on_disk for k in keys)
            out[unit] = LayerInfo(unit, dense, comp, on_disk)
        return out

    def _costs(self, seconds: dict, decode_bps: float | None = None) -> Costs:
        cpu = self.device.type == "cpu"
        return Costs(decode_bps=decode_bps or (1.5e9 if cpu else 200e9), h2d_bps=12e9, disk_bps=1.5e9,
                     layer_seconds=dict(seconds), overlap=0.5 if cpu else 1.0, host_is_device=cpu)

    def _smallest_budget(self, costs) -> int:
        best = None
        for pol in (Resident(0), Offload(0), Offload(0, tier=Tier.DISK)):
            try:
                p = pol.plan((), self._layers, None, costs)
            except BudgetError:  # pragma: no cover
                continue
            best = p.peak_bytes if best is None else min(best, p.peak_bytes)
        return (best or 0) + self.fixed_bytes

    def _measured_decode_bps(self) -> float | None:
        s = self.scheduler
        secs = sum(st.decode_s for st in s.stats.values())
        nbytes = sum(st.decodes * self._layers[u].dense_bytes for u, st in s.stats.items())
        return nbytes / secs if secs > 0 and nbytes > 0 else None

    def _planner(self, trace, seconds):
        costs = self._costs(seconds, self._measured_decode_bps())
        self.costs = costs
        unit_budget = None if self.budget is None else self.budget - self.fixed_bytes
        try:
            return self.policy.plan(trace, self._layers, unit_budget, costs)
        except BudgetError as e:
            msg = (f"nzrt: policy {getattr(self.policy, 'name', self.policy)} does not fit the budget "
                   f"with the traced execution order ({e}); decoding on demand instead")
            warnings.warn(msg, stacklevel=2)
            self._warnings.append(msg)
            tier = Tier.DEVICE if self.device.type == "cpu" else Tier.HOST
            fallback = Resident(0) if tier == Tier.DEVICE else Offload(0)
            return fallback.plan(trace, self._layers, unit_budget, costs)

    def _place(self, plan) -> None:
        """Move every compressed tensor to its tier (the best tier among the units that use it)."""
        rank = {Tier.DENSE: 0, Tier.DEVICE: 1, Tier.HOST: 2, Tier.DISK: 3}
        tiers = plan.tier_of
        key_tier: dict = {}
        for unit, keys in self.units.items():
            t = tiers.get(unit, Tier.DEVICE)
            for k in keys:
                if k not in key_tier or rank[t] < rank[key_tier[k]]:
                    key_tier[k] = t
        cuda = self.device.type == "cuda"
        for k, t in key_tier.items():
            s = self.tensors[k]
            if self._tier_now.get(k) == t:
                continue
            ct = s.ct
            if t == Tier.DISK and s.on_disk:
                new = s.home
            elif t == Tier.DEVICE:
                if cuda:
                    new = ct if ct.device.type == "cuda" else ct.to(self.device)
                else:  # a memory-mapped blob stays mapped: a copy would hold its bytes twice
                    new = ct
            else:  # host, dense (the compressed copy waits in host memory), or disk without a file
                if cuda:
                    host = ct if ct.device.type == "cpu" else ct.to("cpu")
                    new = host if host.is_pinned() or t == Tier.DENSE else host.pin_memory()
                else:
                    new = ct
            s.ct = new
            if not s.on_disk:
                s.home = new  # one copy: the old placement is freed (a file-backed home stays)
            self._tier_now[k] = t

    # -- detach -----------------------------------------------------------------------------
    def detach(self) -> None:
        """Restore the model exactly: parameters bit for bit on their devices, hooks removed."""
        if not self.attached:
            return
        errors = []
        try:
            if self.scheduler is not None:
                self.scheduler.shutdown()
        except BaseException as e:  # pragma: no cover
            errors.append(e)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for module, had, old in reversed(self._forwards):
            if had:
                module.__dict__["forward"] = old
            else:
                module.__dict__.pop("forward", None)
        self._forwards.clear()
        for mp in self.params:
            try:
                self._restore_param(mp)
            except BaseException as e:  # keep restoring the others
                errors.append(e)
        for kind, obj, name, orig in reversed(self._moved):
            if kind == "buffer":
                obj._buffers[name] = orig
            elif kind == "swap":
                for module, pname in obj:
                    module._parameters[pname] = orig
            else:
                obj.data = orig
        self._moved.clear()
        if self.tracker is not None:
            self.tracker.sample()
            self._final_report = self._build_report()
            self.tracker.close()
        self.tensors_kept = None
        _REGISTRY.pop(self.model, None)
        self.attached = False
        self.params_restored = len(self.params)
        self.params = []
        self.tensors = {}
        self.restore = {}
        if self.scheduler is not None:
            self.scheduler.tensors = {}
        if errors:
            raise errors[0]

    def _restore_param(self, mp: _Param) -> None:
        p = mp.param
        if mp.was_meta:  # the original meta parameter is put back with the other swaps
            p.data = torch.empty(0, dtype=mp.dtype, device=p.device)
            return
        if not mp.keys:  # failed before compressing anything
            return
        out = torch.empty(mp.shape, dtype=mp.dtype, device="cpu")
        flat_rows = out.view(mp.shape[0], -1) if out.dim() else out.view(1)
        for key, (a, b) in zip(mp.keys, mp.rows):
            src = self.restore[key] if key in self.restore else self.tensors[key].home
            if src.device.type != "cpu":
                src = src.to("cpu")
            target = flat_rows[a:b].reshape(-1) if mp.chunked else out.view(-1)
            codec.decode_into(src, target, backend=self.backend if self.backend != "triton" else None)
        p.data = out if mp.orig_device.type == "cpu" else out.to(mp.orig_device)

    # -- report -----------------------------------------------------------------------------
    def held_bytes(self) -> dict:
        """Bytes actually held now, measured from the storages (not computed from shapes):
        compressed blobs by where they live, the dense slot pool, uncompressed parameters and
        buffers, and lossless restore copies (lossy mode)."""
        blobs = {"device": 0, "host": 0, "mapped": 0}
        seen = set()
        for s in self.tensors.values():
            for ct in (s.ct, s.home):
                if ct is None or id(ct.data) in seen:
                    continue
                seen.add(id(ct.data))
                if _is_mapped(ct):  # file-backed pages: the blob's own bytes, not the whole map
                    blobs["mapped"] += ct.data.numel()
                    continue
                place = "device" if ct.device == self.device else "host"
                blobs[place] += storage_bytes([ct.data])
        restore = storage_bytes(ct.data for ct in self.restore.values())
        dense = self.scheduler.dense_bytes_held() if self.scheduler is not None else 0
        return {"compressed_device": blobs["device"], "compressed_host": blobs["host"],
                "compressed_mapped": blobs["mapped"],
                "dense_slots": dense, "uncompressed": self._fixed_bytes() if self.attached else 0,
                "restore_copies": restore}

    def report(self) -> Report:
        if not self.attached:
            rep = getattr(self, "_final_report", None)
            if rep is None:
                raise ManagedError("report() needs a managed() block that has been entered")
            return rep
        self.tracker.sample()
        return self._build_report()

    def _build_report(self) -> Report:
        s = self.scheduler
        if s is not None and s.cuda:
            s.cuda_times()
        tiers = s.plan.tier_of if s is not None and s.plan is not None else {}
        layers = []
        for unit, info in self._layers.items():
            st = s.stats[unit] if s is not None else None
            layers.append(LayerReport(
                name=unit, tier=tiers.get(unit, "device"), dense_bytes=info.dense_bytes,
                compressed_bytes=info.compressed_bytes, decodes=st.decodes if st else 0,
                decode_s=st.decode_s if st else 0.0, transfer_s=st.transfer_s if st else 0.0,
                stall_s=st.stall_s if st else 0.0, hits=st.hits if st else 0, misses=st.misses if st else 0,
                runs=st.runs if st else 0))
        held = self.held_bytes() if self.attached else {}
        plan = s.plan if s is not None else None
        return Report(
            policy=getattr(self.policy, "name", str(self.policy)), device=str(self.device),
            plan=plan.summary() if plan is not None else "", budget=self.budget,
            mantissa_bits=self.mantissa_bits, layers=layers, held=held,
            peaks=dict(self.tracker.peaks), nvml=self.tracker.nvml_status,
            runtime_peak_dense=s.runtime_peak if s else 0,
            pool_allocations=s.pool.allocations if s else 0,
            passes=s.passes if s else 0, divergences=s.divergences if s else 0,
            replans=s.replans if s else 0, mode=s.mode if s else "", entry_s=self.entry_seconds,
            warnings=list(self._warnings), fixed_bytes=self.fixed_bytes,
            weights_dense_bytes=sum(s_.dense_bytes for s_ in self.tensors.values()),
            weights_compressed_bytes=sum(s_.ct.nbytes for s_ in self.tensors.values()))


_DECODE_LOCK = threading.Lock()
_SERIAL = None


def _serial_decode() -> bool:
    """numba's "workqueue" threading layer must not run parallel kernels from two threads at
    once (the decode worker and an on-demand decode); "omp" and "tbb" may. Serialise only there."""
    global _SERIAL
    if _SERIAL is None:
        numba = sys.modules.get("numba")
        if numba is None:
            return False
        try:
            _SERIAL = numba.threading_layer() == "workqueue"
        except ValueError:  # no parallel kernel has run yet: be safe until one has
            return True
    return _SERIAL


def _no_grad_check(bindings, args=()) -> None:
    """Autograd would keep references to weights whose buffers are reused: refuse it."""
    for mp, _ in bindings:
        if mp.param.requires_grad:
            raise ManagedError(
                f"nzrt.managed runs inference: {mp.names[0]!r} requires grad and autograd is on. Call the "
                f"model under torch.no_grad() or torch.inference_mode() (generate() already does), or "
                f"call model.requires_grad_(False) first")
    for a in args:
        if isinstance(a, torch.Tensor) and a.requires_grad:
            raise ManagedError(
                f"nzrt.managed runs inference: an input of {mp.names[0]!r}'s module requires grad; "
                f"gradients through managed weights are not supported (use torch.no_grad())")


def _is_mapped(ct) -> bool:
    """Whether a CompressedTensor's bytes come from a memory-mapped file (``nzrt.load``)."""
    return ct.source is not None


def _dense_from(src, like, device, name) -> torch.Tensor:
    if isinstance(src, CompressedTensor):
        src = codec.decompress(src if src.device.type == "cpu" else src)
    if not isinstance(src, torch.Tensor):
        raise ManagedError(f"weights[{name!r}] is a {type(src).__name__}, not a tensor or CompressedTensor")
    if tuple(src.shape) != tuple(like.shape) or src.dtype != like.dtype:
        raise ManagedError(f"weights[{name!r}] is {src.dtype} {tuple(src.shape)}, the model expects "
                           f"{like.dtype} {tuple(like.shape)}")
    return src.to(device)


def managed(model: nn.Module, *, policy="auto", budget=None, mantissa_bits: int | None = None,
            device=None, weights=None, prefetch: bool = True, min_numel: int = DEFAULT_MIN_NUMEL,
            chunk_bytes: int | None = DEFAULT_CHUNK_BYTES, backend: str | None = None) -> Managed:
    """Keep ``model``'s weights compressed inside a ``with`` block; see the module docstring.

    policy: "auto" | "resident" | "offload" | "belady" | "lru" or a policy object
        (``nzrt.policies.Resident(lookahead=2)``, ...).
    budget: None, bytes, "6GiB" or "80%" (of the free device memory).
    mantissa_bits: None for lossless; k keeps k mantissa bits (rounded to nearest).
    device: where the model runs (default: where its parameters are; cpu for a meta model).
    weights: name -> CompressedTensor | Tensor for parameters (and buffers) on the meta device.
    prefetch: False decodes every layer on demand in the calling thread (for comparisons).
    min_numel: smaller parameters stay dense. chunk_bytes: row-chunk size for large embeddings
        and output heads (None: no chunking). backend: the codec backend (default: automatic).
    """
    return Managed(model, policy=policy, budget=budget, mantissa_bits=mantissa_bits, device=device,
                   weights=weights, prefetch=prefetch, min_numel=min_numel, chunk_bytes=chunk_bytes,
                   backend=backend)
