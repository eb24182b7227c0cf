"""What the Triton decode and encode share: whether the interpreter runs the kernels, block
sizes, the symbol-table layout, a small LRU for per-device tables, asynchronous copies from
pinned memory and the device check. No kernels."""
from __future__ import annotations

import os
from collections import OrderedDict

import torch
import triton
import triton.language as tl

from .. import env

try:  # what @triton.jit below decides on (read when this module is imported)
    INTERPRET = bool(triton.knobs.runtime.interpret)
except AttributeError:  # older Triton without knobs
    INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

# Sub-block sizes. Under the interpreter every program costs ~1 ms of Python, so one sub-block
# covers a whole tile (up to 64Ki values). On a GPU, BLOCK / (32 * warps) = 8 consecutive values
# per thread lets the int16 store vectorise and keeps the prefix counts mostly in-thread; 1024
# values on 4 warps is the default (unmeasured: tools/bench_gpu.py sweeps the alternatives and
# `tools/bench_gpu.py --static` counts SASS instructions per value without a GPU).
DECODE_BLOCK = int(env.get("NZRT_TRITON_BLOCK") or (65536 if INTERPRET else 1024))
DECODE_WARPS = int(env.get("NZRT_TRITON_WARPS"))
ENCODE_BLOCK = 65536 if INTERPRET else 2048
PACK_BLOCK = 65536 if INTERPRET else 1024
_RAW_BASE = 128  # table index of raw exponent 0; symbols (<= 4 levels of <= 5 bits: 124) come first
RAW_BASE = tl.constexpr(_RAW_BASE)
SYM_TABLE = _RAW_BASE + 256  # symbols, then the identity for raw exponents (8 bits at most)
META_COLS = 16

_INT_DTYPES = {2: torch.int16, 4: torch.int32}


class _LRU(OrderedDict):
    def __init__(self, cap):
        super().__init__()
        self.cap = cap

    def get_or(self, key, make):
        try:
            self.move_to_end(key)
            return self[key]
        except KeyError:
            value = self[key] = make()
            if len(self) > self.cap:
                self.popitem(last=False)
            return value


def _to_device(host: torch.Tensor, device: torch.device):
    """An asynchronous copy from pinned memory (no host sync); returns (device tensor, source),
    the source to be kept alive as long as the copy may be in flight."""
    if device.type == "cpu":
        return host, host
    pinned = host.pin_memory()
    return pinned.to(device, non_blocking=True), pinned


def _check_device(device: torch.device) -> None:
    if device.type == "cpu" and not INTERPRET:
        raise ValueError("the triton backend runs on CUDA tensors, or on CPU tensors when "
                         "TRITON_INTERPRET=1 was set before nzrt.kernels.triton was imported; "
                         "use backend='numba' or 'reference' for CPU tensors")
