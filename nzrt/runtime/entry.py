"""Entry's taking of the weights: each parameter compressed (or kept dense, or left in its file
map) and committed, buffers moved, every step undoable.

Apart from the session (``handle.py``) because it is one transaction with its own working state
(the file maps seen at entry, the output heads, which weights stay trainable) that ends with
entry. Everything it changes is recorded where the restore (``restore.py``) undoes it: a
committed ``Param`` in ``shared.params`` and its chunks in ``shared.tensors``, a moved buffer or
a swapped meta parameter in ``restore.moved``, a lossy weight's exact copy in ``restore.spill``.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import codec, osmem
from ..format import CompressedTensor
from ..format.rowchunks import RowChunks
from ..scheduler import TensorSlot
from .accounting import is_mapped
from .errors import ManagedError
from .params import (FLOATS, Param, chunk_spans, chunkable_embedding, chunkable_head, find_params, head_spans,
                     output_heads)
from .transaction import deferred_interrupts
from .weight import ManagedParameter, make_placeholder, register, set_data, unregister

_TRIM_BYTES = 1 << 20  # a freed original of at least this size goes back to the OS at once


def resolve_device(model, device_arg) -> torch.device:
    """Where the model runs: ``device_arg``, else where its first real tensor is, else the CPU."""
    if device_arg is not None:
        dev = torch.device(device_arg)
    else:
        dev = None
        for t in list(model.parameters()) + list(model.buffers()):
            if t.device.type != "meta":
                dev = t.device
                break
        dev = dev or torch.device("cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if dev.type not in ("cpu", "cuda"):
        raise ManagedError(f"nzrt runs models on 'cpu' or 'cuda', not {dev}")
    return dev


class Entry:
    """Takes ``model``'s weights under ``config`` into ``shared`` (compressed by ``shared.decoder``),
    recording what it moves in ``restore``; notes go to ``warnings``."""

    def __init__(self, model, config, shared, restore, warnings: list):
        self.model = model
        self.config = config
        self.shared = shared
        self.decoder = shared.decoder
        self.restore = restore
        self.warnings = warnings
        self.device = shared.device
        self.kept_mapped: list = []   # lookup-only embeddings left dense in their file map
        self._file_maps = None        # file-backed address ranges at entry (osmem.file_mappings)
        self._keep_trainable = False  # adapters (trainable beside frozen weights) stay dense
        self._heads: set = set()      # id() of the model's output embeddings, read once at entry

    def take_weights(self) -> list:
        """Every parameter and buffer taken (see the module docstring); returns ``find_params``'s
        list for the steps after it."""
        config, dev = self.config, self.device
        # a Mapping, read one entry at a time (nzrt.loading.safetensors_io reads each tensor from disk
        # only when asked): never copied into a dict, so the dense model never exists whole
        weights = config.weights if config.weights is not None else {}
        used = set()
        self._file_maps = osmem.file_mappings()  # where memory-mapped weights lie
        found = find_params(self.model)
        # an adapter setup (some parameters frozen, e.g. peft's LoRA) without `optimizer`: the
        # trainable ones stay dense, for the caller's optimizer to write
        trainable = [p.requires_grad for p, _, _ in found]
        self._keep_trainable = config.training is None and any(trainable) and not all(trainable)
        if config.mantissa_bits is not None:  # before compressing anything: one clear error
            for p, names, _ in found:
                if p.dtype in FLOATS and p.numel() >= config.min_numel:
                    try:
                        codec.check_mantissa_bits(config.mantissa_bits, p.dtype)
                    except ValueError as e:
                        raise ValueError(f"{names[0]!r} ({p.dtype}): {e}") from None
        self._move_buffers(weights, used, dev)
        # load the encoder's machine code first, then give LLVM's pages (~70-100 MiB, idle from
        # now on) back, before the model's compressed copy grows beside them
        self.warm_codec(found, decode=False)
        osmem.release_idle_code()
        self._heads = output_heads(self.model)
        for p, names, owners in found:
            self._take_param(p, names, owners, weights, used, dev)
            if p.numel() * p.element_size() >= _TRIM_BYTES:
                # give each freed original back now: glibc would keep it in its arenas, and the
                # peak of entry would be the dense and the compressed model together again
                osmem.trim()
        unused = set(weights.keys()) - used
        if unused and config.weights is not None:
            self.warnings.append(f"{len(unused)} entries of `weights` name no meta parameter or buffer "
                                 f"and were ignored, e.g. {sorted(unused)[:3]}")
        return found

    def warm_codec(self, found, decode: bool) -> None:
        """The codec's machine code loaded now for each dtype the model compresses (``Decoder.warm``)."""
        self.decoder.warm([p.dtype for p, _, _ in found if p.numel() >= self.config.min_numel], decode)

    def finish(self) -> None:
        """Entry is over: the file maps seen at entry are not needed any more."""
        self._file_maps = None

    def verify_given(self) -> None:
        """Check the caller's CompressedTensors (CRC-32 and tables); a memory-mapped blob's
        pages go back to the operating system right after its check read them."""
        for s in self.shared.tensors.values():
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
                    new = dense_from(src, b, dev, full)
                elif b.device != dev:
                    new = b.to(dev)
                else:
                    continue
                self.restore.moved.append(("buffer", module, bname, b))
                module._buffers[bname] = new

    def _take_param(self, p, names, owners, weights, used, dev) -> None:
        if self.shared.sharded is not None and p in self.shared.sharded:
            return  # an FSDP2 parameter: its local shard compressed already, or kept dense (fsdp.py)
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
        large_float = p.dtype in FLOATS and p.numel() >= self.config.min_numel
        compressible = large_float and type(p) is nn.Parameter and not (self._keep_trainable and p.requires_grad)
        # a lookup-only embedding that lies in a file map stays there on the CPU: a lookup reads
        # only its rows' pages, so it costs what plain PyTorch pays; compressed, it would be held whole
        lookup_in_file = compressible and dev.type == "cpu" and \
            not (self.config.training is not None and p.requires_grad) and \
            chunkable_embedding(tuple(p.shape), p.element_size(), owners, self.config.chunk_bytes)
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
            self.restore.moved.append(("swap", owners, None, p))
            for module, pname in owners:
                module._parameters[pname] = stand_in
            if not compressible:
                stand_in.data = dense_from(src, p, dev, src_name)
                return
            self._compress_param(stand_in, names, owners, src, head, was_meta=True, shape=p.shape)
            return
        if not compressible:
            if p.device != dev:
                self.restore.moved.append(("param", p, None, p.data))
                p.data = p.data.to(dev)
            return
        self._compress_param(p, names, owners, src, head)

    def _compress_param(self, p, names, owners, src, head: bool, was_meta=False, shape=None) -> None:
        """Compress every chunk first; then commit (swap the data for the placeholder, the class
        for ManagedParameter) in one step that Ctrl-C cannot split. Until the commit the
        parameter is untouched, so a failure while compressing leaves nothing to undo."""
        mp = Param(p, names, owners, self.shared)
        if shape is not None:
            mp.shape = tuple(shape)
        mp.was_meta = was_meta
        lossy = self.config.mantissa_bits is not None
        itemsize = p.element_size()
        # a CompressedTensor given by the caller (e.g. memory-mapped by nzrt.load) is used as it is:
        # re-chunking it would decode it and hold the new chunks in RAM, off the file
        lookup_only = chunkable_embedding(mp.shape, itemsize, owners, self.config.chunk_bytes or 1)
        # the fused policy multiplies a head stored in row chunks chunk by chunk from the file
        # (``blocked.fused_chunks``): never dense whole, never re-encoded into memory
        fused_head = self.config.fused is not None and p.dtype in FLOATS and \
            chunkable_head(tuple(mp.shape), itemsize, owners, self._heads, p.requires_grad)
        if isinstance(src, RowChunks) and not lookup_only and not head and not fused_head:
            src = codec.decompress(src, backend=self.config.backend)  # a GEMM that is not a chunked head needs it whole
        given = src.parts if isinstance(src, RowChunks) else None  # stored as row chunks (.nzrt)
        head = head and given is None and not isinstance(src, CompressedTensor)
        chunked = given is not None or head or (not isinstance(src, CompressedTensor) and
                                                chunkable_embedding(mp.shape, itemsize, owners, self.config.chunk_bytes))
        spans = src.spans if given is not None else head_spans(mp.shape, itemsize) if head else \
            chunk_spans(mp.shape, itemsize, self.config.chunk_bytes) if chunked else [(0, mp.shape[0] if mp.shape else 0)]
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
                on_disk = is_mapped(ct)
            else:
                part = dense_src[a:b] if chunked else dense_src
                ct = self.decoder.compress(part)
                on_disk = False
                if lossy and not was_meta and not keep_original:  # the exact original: on disk, not in RAM
                    self.restore.spill.add(key, self.decoder.compress_exact(part))
                if src_mapped:  # its file pages are read once: give them back chunk by chunk
                    osmem.release_file_pages(part, trusted=True)
            if dense_src is not None:
                ct.verify()
            # else verified in verify_given, after the budget check: reading a .nzrt's blobs
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
                self.shared.params.append(mp)
                for s in slots:
                    self.shared.tensors[s.key] = s
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
                    self.shared.tensors.pop(s.key, None)
                    self.restore.spill.pop(s.key, None)
                if self.shared.params and self.shared.params[-1] is mp:
                    self.shared.params.pop()
                raise
        if not was_meta:
            # the original may view a memory-mapped checkpoint (transformers maps safetensors):
            # freeing it does not unmap the file while other weights view it, so its pages
            # would stay in RSS beside the compressed copy; reclaim them now, one weight at a time
            osmem.release_file_pages(orig, self._file_maps)
        del orig

    def _chunks_head(self, shape, p, owners) -> bool:
        """A large frozen output head is kept in row chunks and multiplied block by block
        (``blocked.py``), unless the fused policy multiplies it from its compressed bytes.
        ``shape``: the parameter's (a meta parameter's stand-in is empty)."""
        if self.config.fused is not None or not self.config.chunk_bytes or p.dtype not in FLOATS:
            return False
        return chunkable_head(tuple(shape), p.element_size(), owners, self._heads, p.requires_grad)


def dense_from(src, like, device, name) -> torch.Tensor:
    if isinstance(src, (CompressedTensor, RowChunks)):
        src = codec.decompress(src)
    if not isinstance(src, torch.Tensor):
        raise ManagedError(f"weights[{name!r}] is a {type(src).__name__}, not a tensor or CompressedTensor")
    if tuple(src.shape) != tuple(like.shape) or src.dtype != like.dtype:
        raise ManagedError(f"weights[{name!r}] is {src.dtype} {tuple(src.shape)}, the model expects "
                           f"{like.dtype} {tuple(like.shape)}")
    return src.to(device)
