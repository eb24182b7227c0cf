"""Fused generation (``policies.Fused``): a pass whose input has few rows reads the compressed
weights straight, never a dense copy.

A *fused pass* is a root forward whose input (``input_ids``, ``inputs_embeds`` or the first tensor
argument) has at most ``max_rows`` rows, with autograd off (or no managed weight requiring a
gradient), on the CPU. In it:

* a plain ``nn.Linear`` whose weight is managed computes ``x @ W.T + b`` with the fused kernel
  (``nzrt.kernels.cpu.fused``) from the weight's compressed bytes, when its own input has at
  most ``max_rows`` rows (else it decodes as usual);
* a plain ``nn.Embedding`` whose weight is managed whole (a head tied to it) decodes only the
  tiles that hold the looked-up rows (exact: a lookup copies rows);
* every other unit is decoded on demand, one at a time; the scheduler neither traces nor
  prefetches (its plan belongs to the passes with many rows: a prompt), and at the start of a
  fused pass it lets go of the dense copies it prefetched for the next traced pass.

Outputs of fused Linears are exact for the weights but summed in the fused kernel's own order
(``fused_reference``), so they are not bit-identical to plain PyTorch's GEMM.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from .decoder import ROW_ID_DTYPES as _INTS  # integer ids: a lookup's input


class FusedStats:
    """What the fused passes did: passes, fused Linear and Embedding calls, compressed bytes
    read by them, seconds in their kernels, and which weights the Linear calls multiplied from
    by the window code's fast path (``kernels.cpu.fused_w4``) and which by the general one (the
    planner's smallest code, or no fast path for that weight here): keys of the weights."""

    def __init__(self):
        self.passes = 0
        self.linear_calls = 0
        self.lookup_calls = 0
        self.bytes_read = 0
        self.seconds = 0.0
        self.window_weights: set = set()
        self.general_weights: set = set()

    def summary(self) -> str:
        rate = f", {self.bytes_read / self.seconds / 1e9:.2f} GB/s compressed" if self.seconds > 0 else ""
        codes = ""
        if self.window_weights or self.general_weights:
            codes = (f"; Linear weights: {len(self.window_weights)} by the window code's fast path, "
                     f"{len(self.general_weights)} by the general path")
        return (f"fused: {self.passes} passes, {self.linear_calls} Linear calls and {self.lookup_calls} "
                f"lookups straight from compressed weights ({self.seconds:.2f} s{rate}){codes}")


def input_rows(args, kwargs) -> int | None:
    """Rows of a forward's input: ids count for integer ids, else tokens (all dims but the last)."""
    t = kwargs.get("input_ids")
    if t is None:
        t = kwargs.get("inputs_embeds")
    if t is None:
        t = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if not isinstance(t, torch.Tensor) or t.dim() == 0:
        return None
    if t.dtype in _INTS:
        return t.numel()
    return t.numel() // max(t.shape[-1], 1)


def wants_fused_pass(shared, args, kwargs) -> bool:
    f = shared.fused
    if f is None or shared.device.type != "cpu":
        return False
    if torch.is_grad_enabled() and any(mp.param.requires_grad for mp in shared.params):
        return False  # autograd may need the weights: the fused kernel has no backward
    rows = input_rows(args, kwargs)
    return rows is not None and rows <= f.max_rows


def _no_grad_needed(*ts) -> bool:
    if not torch.is_grad_enabled():
        return True
    return not any(t is not None and t.requires_grad for t in ts)


def _by_name(module, bindings) -> dict:
    """attribute name -> Param of ``module``'s managed parameters (bindings: [(Param, key)])."""
    return {pname: mp for mp, _ in bindings for m, pname in mp.owners if m is module}


def fusable_linear(module, bindings):
    """The managed weight's Param of a plain ``nn.Linear`` (its own forward, weight managed whole,
    bias dense or absent), else None."""
    if type(module).forward is not nn.Linear.forward or "forward" in module.__dict__:
        return None
    mps = _by_name(module, bindings)
    w = mps.get("weight")
    if w is None or w.chunked or len(w.shape) != 2 or set(mps) - {"weight"}:
        return None
    return w


def fusable_embedding(module, bindings):
    if type(module).forward is not nn.Embedding.forward or "forward" in module.__dict__:
        return None
    if module.max_norm is not None:
        return None
    mps = _by_name(module, bindings)
    w = mps.get("weight")
    return w if w is not None and not w.chunked and len(w.shape) == 2 else None


def multiply(shared, key, x2, bias):
    """``x2 @ W.T + bias`` (``x2``: [rows, K]) by the fused kernel from ``key``'s compressed copy;
    the blob's file pages go back after the read, and the time, bytes and code path are counted
    (the caller counts the call)."""
    fw = shared.fused_weight(key)
    t0 = time.perf_counter()
    y = fw.linear(x2, bias)
    shared.decoder.after_read(fw.ct)
    st = shared.fused_stats
    st.seconds += time.perf_counter() - t0
    st.bytes_read += fw.nbytes
    (st.window_weights if fw.window else st.general_weights).add(key)
    return y


def linear_forward(shared, module, mp, fallback):
    """``module``'s forward: fused in a fused pass, ``fallback`` (the unit's decode path) else."""
    key = mp.keys[0]
    N, K = mp.shape

    def forward(input):
        if not shared.fused_pass or not shared.lock_held():
            return fallback(input)
        bias = module.bias
        rows = input.numel() // K if K else 0
        if (rows > shared.fused.max_rows or input.device.type != "cpu" or input.shape[-1] != K
                or input.dtype not in (mp.dtype, torch.float32) or not _no_grad_needed(input, mp.param, bias)
                or shared.scheduler.is_held(key)):  # held dense already: use that copy
            return fallback(input)
        with shared.lock:
            b = None if bias is None else bias.detach()
            if b is not None and b.dtype not in (torch.bfloat16, torch.float16, torch.float32):
                return fallback(input)
            y = multiply(shared, key, input.reshape(rows, K), b)
            shared.fused_stats.linear_calls += 1
            return y.view(*input.shape[:-1], N)
    return forward


def embedding_forward(shared, module, mp, fallback):
    key = mp.keys[0]

    def forward(input):
        if not shared.fused_pass or not shared.lock_held() or shared.scheduler.is_held(key) or input.dtype not in _INTS:
            return fallback(input)
        if not _no_grad_needed(mp.param):
            return fallback(input)
        with shared.lock:
            fw = shared.fused_weight(key)
            t0 = time.perf_counter()
            out = fw.rows(input)
            shared.decoder.after_read(fw.ct)
            st = shared.fused_stats
            st.seconds += time.perf_counter() - t0
            st.lookup_calls += 1
            return out
    return forward


def install(shared, module, bindings, fallback):
    """The fused forward for ``module`` if it has one, else ``fallback`` itself."""
    mp = fusable_linear(module, bindings)
    if mp is not None:
        return linear_forward(shared, module, mp, fallback)
    mp = fusable_embedding(module, bindings)
    if mp is not None:
        return embedding_forward(shared, module, mp, fallback)
    return fallback
