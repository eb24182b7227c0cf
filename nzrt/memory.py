"""MemoryTracker: device memory from NVML (v2 memory info, the device matched to torch's by UUID),
torch's caching-allocator statistics, and host memory from psutil.

Nothing is initialised at import: NVML is initialised on the first CUDA sample and shut down by
``close()``. Without a GPU or without NVML the tracker says so (``nvml_status``) and the rest works.
"""
from __future__ import annotations

import os
import threading


def _torch():
    import torch
    return torch


class MemoryTracker:
    """Samples memory and keeps peaks. ``device``: the execution device (``torch.device`` or str)."""

    def __init__(self, device=None):
        torch = _torch()
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._nvml = None          # handle, once initialised
        self._nvml_inited = False
        self.nvml_status = "not sampled yet" if self.device.type == "cuda" else "no GPU in use (CPU device)"
        self.peaks: dict = {}
        self._lock = threading.Lock()
        self._proc = None

    # -- sources ------------------------------------------------------------------------------
    def _process(self):
        if self._proc is None:
            import psutil
            self._proc = psutil.Process(os.getpid())
        return self._proc

    def host(self) -> dict:
        import psutil
        vm = psutil.virtual_memory()
        return {"host_rss": self._process().memory_info().rss, "host_available": vm.available,
                "host_total": vm.total}

    def _nvml_handle(self):
        if self._nvml is not None or self.device.type != "cuda":
            return self._nvml
        if self.nvml_status not in ("not sampled yet",):
            return None
        try:
            import pynvml
        except ImportError:
            self.nvml_status = "NVML unavailable: nvidia-ml-py is not installed"
            return None
        try:
            pynvml.nvmlInit()
            self._nvml_inited = True
            want = self._torch_uuid()
            handle = None
            for i in range(pynvml.nvmlDeviceGetCount()):
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                uuid = pynvml.nvmlDeviceGetUUID(h)
                uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
                if want is not None and _strip_uuid(uuid) == want:
                    handle = h
                    break
            if handle is None:
                self.nvml_status = (f"NVML: no device matches torch's {self.device} (uuid {want}); "
                                    "device numbers are not trusted, NVML figures are left out")
                return None
            self._nvml = handle
            self.nvml_status = "ok"
        except Exception as e:  # NVMLError_LibraryNotFound, driver not loaded, ...
            self.nvml_status = f"NVML unavailable: {type(e).__name__}: {e}"
            return None
        return self._nvml

    def _torch_uuid(self):
        torch = _torch()
        try:
            props = torch.cuda.get_device_properties(self.device)
            return _strip_uuid(str(props.uuid))
        except Exception:
            return None

    def device_stats(self) -> dict:
        out: dict = {}
        if self.device.type != "cuda":
            return out
        torch = _torch()
        if torch.cuda.is_initialized():
            out["torch_allocated"] = torch.cuda.memory_allocated(self.device)
            out["torch_reserved"] = torch.cuda.memory_reserved(self.device)
            out["torch_max_allocated"] = torch.cuda.max_memory_allocated(self.device)
        h = self._nvml_handle()
        if h is not None:
            import pynvml
            try:
                try:
                    info = pynvml.nvmlDeviceGetMemoryInfo(h, version=pynvml.nvmlMemory_v2)
                except (TypeError, AttributeError):  # an older binding without v2
                    info = pynvml.nvmlDeviceGetMemoryInfo(h)
                out["nvml_used"] = int(info.used)
                out["nvml_free"] = int(info.free)
                out["nvml_total"] = int(info.total)
                if hasattr(info, "reserved"):
                    out["nvml_reserved"] = int(info.reserved)
            except Exception as e:
                self.nvml_status = f"NVML query failed: {type(e).__name__}: {e}"
        return out

    # -- the face -----------------------------------------------------------------------------
    def snapshot(self) -> dict:
        snap = self.host()
        snap.update(self.device_stats())
        return snap

    def sample(self) -> dict:
        """Take a snapshot and fold it into ``peaks`` (the maximum of every figure)."""
        snap = self.snapshot()
        with self._lock:
            for k, v in snap.items():
                if k in ("host_available", "nvml_free", "host_total", "nvml_total"):
                    continue
                if v is not None and v > self.peaks.get(k, -1):
                    self.peaks[k] = v
        return snap

    def free_bytes(self) -> int:
        """Free memory on the device: NVML or torch.cuda.mem_get_info for CUDA, psutil's
        available memory for the CPU. (Used for budgets given as a percentage.)"""
        if self.device.type == "cuda":
            stats = self.device_stats()
            if "nvml_free" in stats:
                return stats["nvml_free"]
            free, _ = _torch().cuda.mem_get_info(self.device)
            return int(free)
        return int(self.host()["host_available"])

    def close(self) -> None:
        if self._nvml_inited:
            try:
                import pynvml
                pynvml.nvmlShutdown()
            except Exception:
                pass
            self._nvml_inited = False
            self._nvml = None

    def describe(self) -> str:
        return f"device {self.device}; NVML: {self.nvml_status}"


def _strip_uuid(u: str) -> str:
    u = u.strip().lower()
    for prefix in ("gpu-", "mig-"):
        if u.startswith(prefix):
            u = u[len(prefix):]
    return u


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (each storage counted once): what is
    actually held, not what the shapes suggest."""
    seen: dict = {}
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        try:
            st = t.untyped_storage()
            ptr, nbytes = st.data_ptr(), st.nbytes()
        except RuntimeError:  # a tensor without storage (a compressed parameter's placeholder)
            continue
        if ptr == 0 or nbytes == 0:
            continue
        key = (st.device.type, st.device.index, ptr)
        seen[key] = max(seen.get(key, 0), nbytes)
    return sum(seen.values())
