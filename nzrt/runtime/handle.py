"""``Managed``: entry (compress, place, wrap forwards) and exit (restore), each a transaction."""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import weakref

import torch
from torch import nn

from .. import codec, osmem
from ..budget import parse_budget
from ..format import CompressedTensor
from ..memory import MemoryTracker
from ..policies import Fused, Tier, get_policy
from ..format.rowchunks import RowChunks
from ..scheduler import Scheduler, TensorSlot
from . import accounting, fused, placement
from .blocked import chunked_linear_forward
from .embedding import chunked_embedding_forward, row_lookup
from .errors import ManagedError
from .params import (DEFAULT_CHUNK_BYTES, DEFAULT_MIN_NUMEL, FLOATS, Param, chunk_spans, chunkable_embedding, chunkable_head, find_params, head_spans,
                     output_heads, plain_embedding)
from .passes import PassLock, root_forward, unit_forward
from .spill import RestoreSpill
from .training import LRSchedulers, Trainer, as_config
from .transaction import deferred_interrupts
from .weight import ManagedParameter, make_placeholder, register, set_data, unregister

# model -> weakref to its entered handle. Weak both ways: a model kept managed after
# from_pretrained (its forwards refer to the handle, the handle to the model) is freed by the
# garbage collector as a whole once nothing else refers to it.
_REGISTRY: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()


def handle_of(model) -> "Managed | None":
    """The entered ``Managed`` handle of ``model`` (exactly that module), or None."""
    ref = _REGISTRY.get(model)
    run = ref() if ref is not None else None
    return run if run is not None and run.attached else None
_TRIM_BYTES = 1 << 20


class Managed:
    """The handle ``nzrt.managed`` returns; a context manager (``attach``/``detach`` by hand work too)."""

    def __init__(self, model: nn.Module, *, policy="auto", budget=None, mantissa_bits=None, device=None,
                 weights=None, prefetch: bool = True, min_numel: int = DEFAULT_MIN_NUMEL,
                 chunk_bytes: int | None = DEFAULT_CHUNK_BYTES, backend: str | None = None, optimizer=None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"managed() takes a torch.nn.Module, got {type(model).__name__}")
        self.training = as_config(optimizer)
        self.model = model
        self.policy = get_policy(policy)
        self.fused = self.policy if isinstance(self.policy, Fused) else None  # fused generation
        self._budget_arg = budget
        self.mantissa_bits = _check_mantissa_bits(mantissa_bits)
        if self.training is not None and self.mantissa_bits is not None:
            raise ValueError("nzrt: training with mantissa_bits (lossy weights) is not supported: each "
                             "update would be rounded to the kept mantissa bits, so small steps would be "
                             "lost. Train losslessly (mantissa_bits=None), or freeze the lossy base "
                             "(requires_grad_(False)) and train adapters on it without `optimizer`")
        self._device_arg = device
        self.weights = weights
        self.prefetch = prefetch
        self.min_numel = int(min_numel)
        self.chunk_bytes = chunk_bytes
        self.backend = backend
        self.attached = False
        self.lock = PassLock()
        self._finalizer = None
        self._final_report = None
        self._reset()

    def _reset(self):
        self.params: list = []        # committed (managed) Params, in commit order
        self.tensors: dict = {}       # key -> TensorSlot
        self.restore = RestoreSpill()  # key -> lossless copy in a temporary file (lossy mode only)
        self.units: dict = {}         # unit -> tuple of keys
        self._module_units: dict = {}
        self._bindings: dict = {}     # module -> [(Param, key)]
        self._forwards: list = []     # (module, had own forward attr, old value)
        self._moved: list = []        # (kind, object, name, original)
        self.scheduler = None
        self.tracker = None
        self.budget = None
        self.fixed_bytes = 0
        self.entry_seconds = 0.0
        self.layers: dict = {}
        self.warnings: list = []
        self._tier_now: dict = {}
        self.device = torch.device("cpu")
        self._file_maps = None        # file-backed address ranges at entry (osmem.file_mappings)
        self.kept_mapped: list = []   # lookup-only embeddings left dense in their file map
        self._from_disk: set = set()  # id(CompressedTensor) of blobs read from their file each time
        self.weights_dense_bytes = 0
        self.weights_compressed_bytes = 0
        self.trainer = None           # per-parameter optimizers (optimizer=...)
        self.last_saved = None        # weakref to the weight token autograd saved last (saved.py)
        self._keep_trainable = False  # adapters (trainable beside frozen weights) stay dense
        self.fused_pass = False       # inside a fused pass (policies.Fused; runtime/fused.py)
        self.fused_stats = fused.FusedStats()
        self._fused_weights: dict = {}  # key -> kernels.cpu_fused.FusedWeight of its compressed copy
        self.blocked_stats: dict = {"blocked": 0, "whole": 0}  # head calls by path (blocked.py)
        self.rss_after_trim = 0       # RSS after the last end-of-pass trim (passes.py)
        self._heads: set = set()      # id() of the model's output embeddings, read once at entry

    # -- context manager --------------------------------------------------------------------
    def __enter__(self) -> "Managed":
        self.attach()
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    # -- attach -----------------------------------------------------------------------------
    def attach(self) -> "Managed":
        """Compress and take over the model. On any exception (KeyboardInterrupt included) the
        model is put back exactly as it was before the exception propagates."""
        if self.attached:
            raise ManagedError("this managed() handle is already entered")
        for m in self.model.modules():
            if handle_of(m) is not None:
                raise ManagedError("this model (or a module inside it) is already under nzrt.managed(); "
                                   "leave the first `with` block before entering another")
        for m in list(_REGISTRY.keys()):
            if handle_of(m) is not None and any(sub is self.model for sub in m.modules()):
                raise ManagedError("a module containing this model is already under nzrt.managed()")
        t0 = time.perf_counter()
        self._reset()
        self._final_report = None
        try:
            _REGISTRY[self.model] = weakref.ref(self)
            self.attached = True
            self._attach()
        except BaseException as e:
            try:
                self._detach(report=False)
            except ManagedError as r:  # the rollback itself could not restore everything
                raise r from e
            except BaseException:  # an interrupt held back during the rollback: the first one wins
                pass
            raise
        self.entry_seconds = time.perf_counter() - t0
        if self.fused is not None and self.device.type != "cpu":
            self.warnings.append(f"policy {self.fused.name}: fused generation runs on the CPU only for now; "
                                 f"on {self.device.type} every pass takes the base policy's decode-then-matmul path")
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
        self.device = dev = self._resolve_device()
        self.tracker = MemoryTracker(dev)
        # a Mapping, read one entry at a time (nzrt.safetensors_io reads each tensor from disk
        # only when asked): never copied into a dict, so the dense model never exists whole
        weights = self.weights if self.weights is not None else {}
        used = set()
        self._file_maps = osmem.file_mappings()  # where memory-mapped weights lie
        found = find_params(self.model)
        # an adapter setup (some parameters frozen, e.g. peft's LoRA) without `optimizer`: the
        # trainable ones stay dense, for the caller's optimizer to write
        trainable = [p.requires_grad for p, _, _ in found]
        self._keep_trainable = self.training is None and any(trainable) and not all(trainable)
        if self.mantissa_bits is not None:  # before compressing anything: one clear error
            for p, names, _ in found:
                if p.dtype in FLOATS and p.numel() >= self.min_numel:
                    try:
                        codec.check_mantissa_bits(self.mantissa_bits, p.dtype)
                    except ValueError as e:
                        raise ValueError(f"{names[0]!r} ({p.dtype}): {e}") from None
        self._move_buffers(weights, used, dev)
        # load the encoder's machine code first, then give LLVM's pages (~70-100 MiB, idle from
        # now on) back, before the model's compressed copy grows beside them
        self._warm_codec(found, decode=False)
        osmem.release_idle_code()
        self._heads = output_heads(self.model)
        for p, names, owners in found:
            self._take_param(p, names, owners, weights, used, dev)
            if p.numel() * p.element_size() >= _TRIM_BYTES:
                # give each freed original back now: glibc would keep it in its arenas, and the
                # peak of entry would be the dense and the compressed model together again
                osmem.trim()
        unused = set(weights.keys()) - used
        if unused and self.weights is not None:
            self.warnings.append(f"{len(unused)} entries of `weights` name no meta parameter or buffer "
                                 f"and were ignored, e.g. {sorted(unused)[:3]}")
        self._build_units()
        self.fixed_bytes = accounting.fixed_bytes(self.model, [mp.param for mp in self.params], dev)
        self.budget = parse_budget(self._budget_arg, lambda: self.tracker.free_bytes())
        self.layers = placement.layer_infos(self.units, self.tensors)
        costs = placement.costs_for(dev, {})
        initial = placement.initial_plan(self.policy, self.layers, self.budget, self.fixed_bytes, costs)
        self._verify_given()
        self._warm_codec(found, decode=True)  # the decoders' code pages go back at the end of entry (settle)
        threads = os.environ.get("NZRT_DECODE_THREADS")  # numba threads of the CPU decode worker
        self.scheduler = Scheduler(self.units, self.tensors, dev, planner=self._planner, place=self._place,
                                   decode=self._decode, prefetch=self.prefetch,
                                   decode_threads=int(threads) if threads else None)
        self._place(initial)
        self.scheduler.plan = initial
        worker = self.scheduler._worker
        if worker is not None:  # collected without detach (from_pretrained): stop the thread
            self._finalizer = weakref.finalize(self, worker.stop, False)
        self._install_forwards()
        if self.training is not None:
            self.trainer = Trainer(self, self.training)
            self.trainer.attach()
        self.weights_dense_bytes = sum(s.dense_bytes for s in self.tensors.values())
        self.weights_compressed_bytes = sum(s.ct.nbytes for s in self.tensors.values())
        self._file_maps = None
        osmem.settle()  # the compressor's temporaries and LLVM's idle code go back to the OS
        self.tracker.sample()

    def _verify_given(self) -> None:
        """Check the caller's CompressedTensors (CRC-32 and tables); a memory-mapped blob's
        pages go back to the operating system right after its check read them."""
        for s in self.tensors.values():
            if not s.ct._verified:
                s.ct.verify()
                if s.on_disk:
                    osmem.release_file_pages(s.ct.data, self._file_maps)

    def _move_buffers(self, weights, used, dev) -> None:
        """Meta buffers from ``weights``, others moved to the device if needed."""
        for mname, module in self.model.named_modules():
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
                    used.add(full)
                    new = _dense_from(src, b, dev, full)
                elif b.device != dev:
                    new = b.to(dev)
                else:
                    continue
                self._moved.append(("buffer", module, bname, b))
                module._buffers[bname] = new

    def _take_param(self, p, names, owners, weights, used, dev) -> None:
        src_name = next((n for n in names if n in weights), None)
        is_meta = p.device.type == "meta"
        if src_name is not None and not is_meta:
            raise ManagedError(f"`weights` has an entry for {src_name!r}, but that parameter already "
                               f"holds data; `weights` fills parameters on the meta device only")
        if is_meta and src_name is None:
            raise ManagedError(f"parameter {names[0]!r} is on the meta device and `weights` has no "
                               f"entry for it")
        if type(p) is ManagedParameter:
            raise ManagedError(f"parameter {names[0]!r} is already managed by another nzrt.managed() block")
        large_float = p.dtype in FLOATS and p.numel() >= self.min_numel
        compressible = large_float and type(p) is nn.Parameter and not (self._keep_trainable and p.requires_grad)
        # a lookup-only embedding that lies in a file map stays there on the CPU: a lookup reads
        # only its rows' pages, so it costs what plain PyTorch pays; compressed, it would be held whole
        lookup_in_file = compressible and dev.type == "cpu" and \
            not (self.training is not None and p.requires_grad) and \
            chunkable_embedding(tuple(p.shape), p.element_size(), owners, self.chunk_bytes)
        # a head kept in row chunks is compressed chunk by chunk from its file map: never dense whole
        head = self._chunks_head(p.shape, p, owners)  # decided once: its compression follows it
        head_in_file = compressible and not lookup_in_file and head
        mapped = None
        if src_name is not None:
            used.add(src_name)
            if lookup_in_file or head_in_file:  # mapped from the caller's file (SafetensorsDir): never read whole
                finder = getattr(weights, "mapped", None)
                mapped = finder(src_name) if finder is not None else None
                if mapped is not None and (tuple(mapped.shape) != tuple(p.shape) or mapped.dtype != p.dtype):
                    mapped = None
        src = mapped if mapped is not None else weights[src_name] if src_name is not None else None
        if large_float and type(p) is not nn.Parameter and not is_meta:
            self.warnings.append(f"{names[0]!r} is a {type(p).__name__}, not a plain nn.Parameter: kept dense")
        if isinstance(src, (CompressedTensor, RowChunks)):
            if tuple(src.shape) != tuple(p.shape) or src.dtype != p.dtype:
                raise ManagedError(f"weights[{src_name!r}] is {src.dtype} {tuple(src.shape)}, the "
                                   f"parameter is {p.dtype} {tuple(p.shape)}")
            compressible = True
        if mapped is not None and lookup_in_file:
            compressible = False
            self.kept_mapped.append(names[0])
        elif lookup_in_file and not is_meta and osmem.is_file_backed(p.detach(), self._file_maps):
            self.kept_mapped.append(names[0])
            return
        if is_meta:
            # a meta parameter cannot take data of another device in place: a new Parameter
            # stands in for it in every module that owns it, the meta one comes back on exit
            stand_in = nn.Parameter(torch.empty(0, dtype=p.dtype, device=dev), requires_grad=p.requires_grad)
            self._moved.append(("swap", owners, None, p))
            for module, pname in owners:
                module._parameters[pname] = stand_in
            if not compressible:
                stand_in.data = _dense_from(src, p, dev, src_name)
                return
            self._compress_param(stand_in, names, owners, src, head, was_meta=True, shape=p.shape)
            return
        if not compressible:
            if p.device != dev:
                self._moved.append(("param", p, None, p.data))
                p.data = p.data.to(dev)
            return
        self._compress_param(p, names, owners, src, head)

    def _compress_param(self, p, names, owners, src, head: bool, was_meta=False, shape=None) -> None:
        """Compress every chunk first; then commit (swap the data for the placeholder, the class
        for ManagedParameter) in one step that Ctrl-C cannot split. Until the commit the
        parameter is untouched, so a failure while compressing leaves nothing to undo."""
        mp = Param(p, names, owners, self)
        if shape is not None:
            mp.shape = tuple(shape)
        mp.was_meta = was_meta
        lossy = self.mantissa_bits is not None
        itemsize = p.element_size()
        # a CompressedTensor given by the caller (e.g. memory-mapped by nzrt.load) is used as it is:
        # re-chunking it would decode it and hold the new chunks in RAM, off the file
        lookup_only = chunkable_embedding(mp.shape, itemsize, owners, self.chunk_bytes or 1)
        if isinstance(src, RowChunks) and not lookup_only and not head:
            src = src.decompress(backend=self.backend)  # a GEMM that is not a chunked head needs it whole
        given = src.parts if isinstance(src, RowChunks) else None  # stored as row chunks (.nzrt)
        head = head and given is None and not isinstance(src, CompressedTensor)
        chunked = given is not None or head or (not isinstance(src, CompressedTensor) and
                                                chunkable_embedding(mp.shape, itemsize, owners, self.chunk_bytes))
        spans = src.spans if given is not None else head_spans(mp.shape, itemsize) if head else \
            chunk_spans(mp.shape, itemsize, self.chunk_bytes) if chunked else [(0, mp.shape[0] if mp.shape else 0)]
        dense_src = None
        if src is None:
            dense_src = p.detach()
        elif isinstance(src, torch.Tensor):  # dense, e.g. read from a safetensors file just now
            if tuple(src.shape) != tuple(mp.shape) or src.dtype != mp.dtype:
                raise ManagedError(f"weights[{names[0]!r}] is {src.dtype} {tuple(src.shape)}, the "
                                   f"parameter is {mp.dtype} {tuple(mp.shape)}")
            dense_src = src.detach()
        # an original that views a memory-mapped file is kept (its pages are reclaimed below and
        # cost nothing while managed): exit points the parameter back at it, no decode, no copy
        keep_original = src is None and not was_meta and osmem.is_file_backed(p.detach(), self._file_maps)
        src_mapped = dense_src is not None and chunked and osmem.is_file_backed(dense_src)
        slots = []
        for i, (a, b) in enumerate(spans):
            key = f"{names[0]}#{i}" if chunked else names[0]
            if dense_src is None:  # given by the caller (e.g. nzrt.load's memory map)
                ct = given[i] if given is not None else src
                on_disk = accounting.is_mapped(ct)
            else:
                part = dense_src[a:b] if chunked else dense_src
                ct = codec.compress(part, mantissa_bits=self.mantissa_bits, backend=self.compress_backend(part),
                                    widths=self.compress_widths)
                on_disk = False
                if lossy and not was_meta and not keep_original:  # the exact original: on disk, not in RAM
                    self.restore.add(key, codec.compress(part, backend=self.compress_backend(part)))
                if src_mapped:  # its file pages are read once: give them back chunk by chunk
                    osmem.release_file_pages(part, trusted=True)
            if dense_src is not None:
                ct.verify()
            # else verified in _verify_given, after the budget check: reading a .nzrt's blobs
            # (their checksums) must wait until the plan is known to fit
            slots.append(TensorSlot(key=key, ct=ct, shape=tuple(ct.shape), dtype=ct.dtype,
                                    numel=ct.numel(), home=ct, on_disk=on_disk))
            mp.keys.append(key)
            mp.rows.append((a, b))
        mp.chunked = chunked
        placeholder = make_placeholder(mp.shape, mp.dtype, self.device)
        del dense_src
        orig = p.detach()  # an alias of the dense data, to undo a commit cut short
        with deferred_interrupts():
            try:
                self.params.append(mp)
                for s in slots:
                    self.tensors[s.key] = s
                mp.placeholder = placeholder
                register(p, mp)
                set_data(p, placeholder)  # frees the dense original (when nothing else holds it)
                p.__class__ = ManagedParameter
                mp.active = True
                mp.file_original = orig if keep_original else None
            except BaseException:
                unregister(p)
                p.__class__ = mp.orig_class
                set_data(p, orig)
                for s in slots:
                    self.tensors.pop(s.key, None)
                    self.restore.pop(s.key, None)
                if self.params and self.params[-1] is mp:
                    self.params.pop()
                raise
        if not was_meta:
            # the original may view a memory-mapped checkpoint (transformers maps safetensors):
            # freeing it does not unmap the file while other weights view it, so its pages
            # would stay in RSS beside the compressed copy; reclaim them now, one weight at a time
            osmem.release_file_pages(orig, self._file_maps)
        del orig

    def _warm_codec(self, found, decode: bool) -> None:
        """Load the codec's machine code now (the encoder, or the decoder), for each dtype the
        model has, on a tensor large enough for the parallel kernels: so that no compiler page is
        touched later, while the model's compressed copy is held (compression, the first pass)."""
        if self.device.type != "cpu":
            return
        g = torch.Generator().manual_seed(0)
        for dtype in dict.fromkeys(p.dtype for p, _, _ in found if p.dtype in FLOATS and p.numel() >= self.min_numel):
            t = torch.randn(1 << 17, generator=g).mul_(0.02).to(dtype)  # 16 tiles: the parallel path
            ct = codec.compress(t, mantissa_bits=self.mantissa_bits, backend=self.compress_backend(t),
                                widths=self.compress_widths)
            if decode:
                codec.decode_into(ct, torch.empty_like(t), backend=self.backend)

    def _chunks_head(self, shape, p, owners) -> bool:
        """A large frozen output head is kept in row chunks and multiplied block by block
        (``blocked.py``), unless the fused policy multiplies it from its compressed bytes.
        ``shape``: the parameter's (a meta parameter's stand-in is empty)."""
        if self.fused is not None or not self.chunk_bytes or p.dtype not in FLOATS:
            return False
        return chunkable_head(tuple(shape), p.element_size(), owners, self._heads, p.requires_grad)

    @property
    def compress_widths(self):
        """The exponent code weights are compressed with: the Fused policy's (``"auto"``: the
        window code where its fast fused path runs), else the planner's (None)."""
        w = self.fused.widths if self.fused is not None else None
        if w == "auto":
            from ..kernels.cpu.fused_w4 import HAS_AVX512BW  # numba: not at import
            w = codec.WINDOW4 if self.device.type == "cpu" and HAS_AVX512BW else None
        return w

    def compress_backend(self, t):
        return self.backend if self.backend is not None or t.device.type != "cuda" else None

    def compress_lossless(self, t):
        """``t`` compressed losslessly now (a training step), never beside a decode of the worker
        where numba's threading layer forbids two parallel kernels at once."""
        with _codec_lock():
            return codec.compress(t, backend=self.compress_backend(t))

    def decompress(self, ct):
        out = torch.empty(ct.shape, dtype=ct.dtype, device=ct.device)
        self._decode(ct, out)
        return out

    def update_weight(self, mp, dense) -> None:
        """A training step changed ``mp``'s weight to ``dense`` (exact, on the device): compress
        each chunk again (lossless), put it on its tier, and give held dense copies the new values."""
        rows = dense.view(mp.shape[0], -1) if dense.dim() else dense.view(1)
        cuda = self.device.type == "cuda"
        for key, (a, b) in zip(mp.keys, mp.rows):
            part = rows[a:b].reshape((b - a,) + tuple(mp.shape[1:])) if mp.chunked else dense
            ct = self.compress_lossless(part)
            s = self.tensors[key]
            tier = self._tier_now.get(key)
            if cuda and tier not in (None, Tier.DEVICE):  # host tiers: pinned host memory
                ct = ct.to("cpu").pin_memory()
            self.weights_compressed_bytes += ct.nbytes - s.ct.nbytes
            self._from_disk.discard(id(s.ct))
            s.ct = s.home = ct
            s.on_disk = False
            self.scheduler.refresh(key, part.reshape(-1))
        mp.file_original = None  # the trained values are in the compressed copy now
        mp.version += 1

    def _decode(self, ct, buf):
        with _codec_lock():
            codec.decode_into(ct, buf, backend=self.backend)
        self.after_read(ct)

    def dense_copy(self, mp) -> torch.Tensor:
        """A fresh dense tensor with the parameter's values (what its module computes with)."""
        return self.dense_into(mp, torch.empty(mp.shape, dtype=mp.dtype, device=self.device))

    def dense_into(self, mp, out) -> torch.Tensor:
        """The parameter's values decoded into ``out`` (contiguous, its shape and dtype)."""
        return _decode_chunks(mp, out, lambda key: self.tensors[key].ct, self._decode)

    # -- units and forwards ---------------------------------------------------------------------
    def _build_units(self) -> None:
        by_module: dict = {}
        names = {id(m): n for n, m in self.model.named_modules(remove_duplicate=False)}
        for mp in self.params:
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

    def _wrap(self, module, make) -> None:
        had = "forward" in module.__dict__
        self._forwards.append((module, had, module.__dict__.get("forward")))
        module.forward = make(module.forward)

    def _install_forwards(self) -> None:
        for module, (unit, chunked_mp, chunk_units) in self._module_units.items():
            if chunked_mp is not None and isinstance(module, nn.Linear):  # a head in row chunks
                self._wrap(module, lambda inner, m=chunked_mp, c=chunk_units:
                           chunked_linear_forward(self, m, c, lambda m=m: self.dense_copy(m)))
            elif chunked_mp is not None and plain_embedding(module):  # its only weight is in chunks
                self._wrap(module, lambda inner, m=chunked_mp, c=chunk_units:
                           chunked_embedding_forward(self, m, c))
            elif chunked_mp is not None:  # its own forward runs; its F.embedding reads the chunks
                chunked_mp.row_lookup = row_lookup(self, chunked_mp, chunk_units)
            elif unit is not None:
                def make(inner, u=unit, m=module, b=self._bindings[module]):
                    f = unit_forward(self, u, b, inner)
                    return fused.install(self, m, b, f) if self.fused is not None else f
                self._wrap(module, make)
        self._wrap(self.model, lambda inner: root_forward(self, inner))

    def lock_held(self) -> bool:
        return self.lock.owner == threading.get_ident()

    def fused_weight(self, key):
        """The fused kernels' prepared view of ``key``'s compressed copy (rebuilt when it changed)."""
        ct = self.tensors[key].ct
        fw = self._fused_weights.get(key)
        if fw is None or fw.ct is not ct:
            from ..kernels.cpu.fused import FusedWeight
            fw = self._fused_weights[key] = FusedWeight(ct)
        return fw

    def after_read(self, ct) -> None:
        """A kernel read ``ct`` (a decode, or a fused pass reading it straight): the disk tier's
        file pages go back after each read."""
        if id(ct) in self._from_disk:
            osmem.release_file_pages(ct.data, trusted=True)

    # -- planning -------------------------------------------------------------------------------
    def _measured_decode_bps(self) -> float | None:
        s = self.scheduler
        secs = sum(st.decode_s for st in s.stats.values())
        nbytes = sum(st.decodes * self.layers[u].dense_bytes for u, st in s.stats.items())
        return nbytes / secs if secs > 0 and nbytes > 0 else None

    def _planner(self, trace, seconds):
        costs = placement.costs_for(self.device, seconds, self._measured_decode_bps())
        self.costs = costs
        osmem.release_idle_code()  # the recorded pass loaded the decoders' code: LLVM is idle again
        return placement.replan(self.policy, trace, self.layers, self.budget, self.fixed_bytes, costs,
                                self.device, self.warnings.append)

    def _place(self, plan) -> None:
        placement.place(plan, self.units, self.tensors, self._tier_now, self.device)
        # blobs read straight from a memory-mapped file (disk tier): ids of their CompressedTensors
        self._from_disk = {id(s.ct) for k, s in self.tensors.items()
                           if self._tier_now.get(k) == "disk" and s.on_disk and s.ct.device.type == "cpu"}
        # a lookup-only embedding's row chunks in a file are read from it each time, whatever the
        # tier: ids fall all over the table, so their pages would soon hold all of it, where plain
        # PyTorch keeps only the rows it read
        self._from_disk |= {id(self.tensors[k].ct) for mp in self.params if mp.chunked for k in mp.keys
                            if self.tensors[k].on_disk and self.tensors[k].ct.device.type == "cpu"}

    # -- detach -----------------------------------------------------------------------------
    def detach(self) -> None:
        """Restore the model exactly: parameters bit for bit on their devices, forwards unwrapped.
        Ctrl-C during the restore is held back until it is complete. If a parameter cannot be
        restored (its decode keeps failing), it stays managed -- still readable, exact -- and
        ``ManagedError`` says so; calling ``detach()`` again retries."""
        if not self.attached:
            return
        self._detach(report=True)

    def _detach(self, report: bool) -> None:
        with deferred_interrupts():
            errors: list = []
            if self.trainer is not None:
                self.trainer.detach()
            if self.scheduler is not None:
                try:
                    self.scheduler.shutdown()
                except BaseException as e:  # pragma: no cover
                    errors.append(e)
            for module, had, old in reversed(self._forwards):
                if had:
                    module.__dict__["forward"] = old
                else:
                    module.__dict__.pop("forward", None)
            self._forwards.clear()
            self._fused_weights.clear()
            failed = []
            for mp in self.params:  # one weight at a time: restore it, then free its compressed copy
                if mp.active and not self._restore_with_retry(mp, errors):
                    failed.append(mp)
                elif not mp.active:
                    self._drop_compressed(mp)
            if not failed:
                for kind, obj, name, orig in reversed(self._moved):
                    if kind == "buffer":
                        obj._buffers[name] = orig
                    elif kind == "swap":
                        for module, pname in obj:
                            module._parameters[pname] = orig
                    else:
                        obj.data = orig
                self._moved.clear()
            if report and self.tracker is not None:
                try:
                    self.tracker.sample()
                    self._final_report = accounting.build_report(self, {})
                except BaseException as e:  # the report is a view; the restore matters more
                    self._final_report = None
                    errors.append(e)
                    self.warnings.append(f"the report could not be built: {e!r}")
            if failed:
                self.params = failed
                raise ManagedError(
                    f"nzrt: {len(failed)} parameter(s) could not be restored (e.g. {failed[0].names[0]!r}: "
                    f"{errors[-1]!r}); they stay compressed and readable. Call detach() again to retry"
                ) from errors[-1]
            try:
                if self.tracker is not None:
                    self.tracker.close()
            except Exception:  # pragma: no cover
                pass
            _REGISTRY.pop(self.model, None)
            if self._finalizer is not None:
                self._finalizer.detach()
                self._finalizer = None
            self.attached = False
            self.params_restored = len(self.params)
            self.params = []
            self.tensors = {}
            self.restore.close()
            self.restore = RestoreSpill()
            if self.scheduler is not None:
                self.scheduler.tensors = {}
            osmem.trim()  # what was freed goes back to the operating system
        # everything is restored; an interrupt that came while restoring is raised now
        interrupt = next((e for e in errors if not isinstance(e, Exception)), None)
        if interrupt is not None:
            raise interrupt

    def _drop_compressed(self, mp) -> None:
        """Free a restored parameter's compressed chunks (and lossy restore copies)."""
        for key in mp.keys:
            s = self.tensors.pop(key, None)
            if s is not None:
                s.ct = s.home = None
            self.restore.pop(key, None)

    def _restore_with_retry(self, mp, errors) -> bool:
        """Restore one parameter; a failed decode is tried once more with the reference backend
        (an interrupt or a transient MemoryError must not leave it half restored)."""
        for backend in (self.backend if self.backend != "triton" else None, "reference"):
            try:
                self._restore_param(mp, backend)
                return True
            except BaseException as e:
                errors.append(e)
        return False

    def _restore_param(self, mp, backend) -> None:
        p = mp.param
        if mp.file_original is not None:  # its own memory-mapped storage again
            out = mp.file_original
        elif not mp.was_meta:  # a meta parameter's stand-in is dropped with the swaps
            out = torch.empty(mp.shape, dtype=mp.dtype, device="cpu")
            def decode(ct, buf):
                codec.decode_into(ct, buf, backend=backend)
                if ct.source == _SPILLED:
                    self.restore.release(ct)

            _decode_chunks(mp, out, lambda key: self.restore.get(key) if key in self.restore
                           else self.tensors[key].home, decode)
            if mp.orig_device.type != "cpu":
                out = out.to(mp.orig_device)
        else:
            out = torch.empty(0, dtype=mp.dtype, device=self.device)
        unregister(p)
        set_data(p, out)
        p.__class__ = mp.orig_class
        mp.active = False
        mp.file_original = None

    # -- training (optimizer=...; nzrt.runtime.training) -----------------------------------------
    def _trainer(self) -> Trainer:
        if self.trainer is None or not self.attached:
            raise ManagedError("this needs an entered nzrt.managed(model, optimizer=...) block")
        return self.trainer

    @property
    def optimizers(self) -> dict:
        """{parameter name: its torch.optim.Optimizer} (one per trainable parameter)."""
        return self._trainer().optimizers

    def step(self) -> None:
        """Apply every parameter's optimizer to its stored gradient, one weight at a time
        (``OptimizerConfig(in_backward=False)``; with the step in the backward there is nothing left)."""
        self._trainer().step_all()

    def zero_grad(self) -> None:
        self._trainer().zero_grad()

    def lr_scheduler(self, factory) -> "LRSchedulers":
        """One learning-rate scheduler per optimizer, ``factory(optimizer)`` each (e.g.
        ``lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, warmup)``); step them all with the
        returned object's ``step()``. Kept in ``state_dict()``."""
        return self._trainer().lr_scheduler(factory)

    def state_dict(self) -> dict:
        """Optimizer (and LR scheduler) states for resuming; compressed states stay compressed.
        The weights are written by ``save(path)``."""
        return self._trainer().state_dict()

    def load_state_dict(self, sd: dict) -> None:
        self._trainer().load_state_dict(sd)

    def save(self, path, tokenizer=None) -> None:
        """Write the model's current weights as a ``.nzrt`` straight from their compressed copies
        (small parameters and buffers are stored dense, as they are). ``tokenizer``: stored too,
        for ``nzrt generate FILE``."""
        from .saving import save_run
        with self.lock:
            save_run(self, path, tokenizer)

    # -- report -----------------------------------------------------------------------------
    def held_bytes(self) -> dict:
        return accounting.held_bytes(self)

    def report(self):
        if not self.attached:
            if self._final_report is None:
                raise ManagedError("report() needs a managed() block that has been entered")
            return self._final_report
        self.tracker.sample()
        return accounting.build_report(self, self.held_bytes())


_SPILLED = RestoreSpill.SOURCE
_DECODE_LOCK = threading.Lock()
_SERIAL = None


def _codec_lock():
    """The lock that serialises codec kernels where numba's threading layer needs it, else none."""
    return _DECODE_LOCK if _serial_decode() else contextlib.nullcontext()


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


def _decode_chunks(mp, out, source, decode) -> torch.Tensor:
    """Decode each chunk of ``mp`` (``source(key)``: its CompressedTensor) into its rows of ``out``."""
    rows = out.view(mp.shape[0], -1) if out.dim() else out.view(1)
    for key, (a, b) in zip(mp.keys, mp.rows):
        ct = source(key)
        if ct.device != out.device:
            ct = ct.to(out.device)
        decode(ct, rows[a:b].reshape(-1) if mp.chunked else out.view(-1))
    return out


def _check_mantissa_bits(k):
    """The type and the widest range (fp32's) at once; each weight's dtype before compressing."""
    return codec.check_mantissa_bits(k, torch.float32)


def _dense_from(src, like, device, name) -> torch.Tensor:
    if isinstance(src, CompressedTensor):
        src = codec.decompress(src)
    elif isinstance(src, RowChunks):
        src = src.decompress()
    if not isinstance(src, torch.Tensor):
        raise ManagedError(f"weights[{name!r}] is a {type(src).__name__}, not a tensor or CompressedTensor")
    if tuple(src.shape) != tuple(like.shape) or src.dtype != like.dtype:
        raise ManagedError(f"weights[{name!r}] is {src.dtype} {tuple(src.shape)}, the model expects "
                           f"{like.dtype} {tuple(like.shape)}")
    return src.to(device)
