"""nzrt: keep a PyTorch model's weights compressed and decode each layer just in time.

Importing nzrt is cheap: no CUDA, NVML, numba or triton work happens until it is needed.
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = [
    "CompressedTensor",
    "FormatError",
    "compress",
    "decompress",
    "decode_into",
    "save",
    "load",
    "load_metadata",
    "managed",
    "OptimizerConfig",
    "from_pretrained",
    "report",
    "release",
]

_LAZY = {
    "CompressedTensor": "format",
    "FormatError": "format",
    "compress": "codec",
    "decompress": "codec",
    "decode_into": "codec",
    "save": "format.checkpoint",
    "load": "format.checkpoint",
    "load_metadata": "format.checkpoint",
    "managed": "runtime",
    "OptimizerConfig": "runtime",
    "from_pretrained": "pretrained",
    "report": "pretrained",
    "release": "pretrained",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'nzrt' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
