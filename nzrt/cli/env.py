"""``nzrt env``: versions, GPUs (through NVML), the decode backend that will run, CPU threads."""
from __future__ import annotations

import os
import platform
import sys


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def gpus() -> dict:
    """{"driver": ..., "gpus": [{"index", "name", "memory_total", "memory_free"}]} or an "error"."""
    try:
        import pynvml
    except ImportError:
        return {"gpus": [], "error": "nvidia-ml-py is not installed"}
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        return {"gpus": [], "error": f"NVML unavailable ({e})"}
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            name = pynvml.nvmlDeviceGetName(h)
            out.append({"index": i, "name": name.decode() if isinstance(name, bytes) else name,
                        "memory_total": int(mem.total), "memory_free": int(mem.free)})
        return {"driver": driver.decode() if isinstance(driver, bytes) else driver, "gpus": out}
    except pynvml.NVMLError as e:
        return {"gpus": [], "error": f"NVML error ({e})"}
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def driver_version() -> str:
    """The NVIDIA driver version: from NVML, else from nvidia-smi, else "?"."""
    driver = gpus().get("driver")
    if driver:
        return driver
    import subprocess
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"
    return out.splitlines()[0] if out else "?"


def backend_info() -> dict:
    """The decode backend that will run on the default device, and whether it loads."""
    import torch

    from .. import codec
    from ..kernels import backends, env as settings

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = {"device": str(device)}
    try:
        name = codec.resolve_backend(None, device)
    except ValueError as e:
        return dict(info, backend=None, error=str(e))
    info["backend"] = name
    try:
        backends.get(name).load()
    except Exception as e:  # noqa: BLE001 - report why the backend cannot load
        info["error"] = f"{type(e).__name__}: {e}"
    if settings.get("NZRT_BACKEND"):
        info["forced_by"] = "NZRT_BACKEND"
    return info


def collect() -> dict:
    import torch

    info = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": {name: _version(dist) for name, dist in
                     (("nzrt", "nzrt"), ("torch", "torch"), ("triton", "triton"), ("numba", "numba"),
                      ("numpy", "numpy"), ("transformers", "transformers"))},
        "cuda": {"available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda},
        "nvml": gpus(),
        "decode": backend_info(),
        "cpu": {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None},
    }
    if info["versions"]["numba"]:
        try:
            import numba

            info["cpu"]["numba_threads"] = int(numba.config.NUMBA_NUM_THREADS)
        except Exception:  # noqa: BLE001
            pass
    return info


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def format_env(info: dict) -> str:
    lines = ["versions: " + ", ".join(f"{k} {v or 'not installed'}" for k, v in info["versions"].items()),
             f"python {info['python']} on {info['platform']}"]
    nv = info["nvml"]
    if nv.get("gpus"):
        lines.append(f"GPUs (NVML, driver {nv.get('driver')}):")
        for g in nv["gpus"]:
            lines.append(f"  [{g['index']}] {g['name']}: {_gib(g['memory_total'])} total, "
                         f"{_gib(g['memory_free'])} free")
    else:
        lines.append(f"GPUs: none" + (f" ({nv['error']})" if nv.get("error") else ""))
    cuda = info["cuda"]
    lines.append(f"torch CUDA: {'available' if cuda['available'] else 'not available'}"
                 + (f" (built for CUDA {cuda['torch_cuda']})" if cuda["torch_cuda"] else " (CPU build)"))
    d = info["decode"]
    line = f"decode backend on {d['device']}: {d.get('backend')}"
    if d.get("forced_by"):
        line += f" (forced by {d['forced_by']})"
    if d.get("error"):
        line += f" -- cannot load: {d['error']}"
    lines.append(line)
    c = info["cpu"]
    lines.append(f"CPU: {c['cores']} cores, torch threads {c['torch_threads']}"
                 + (f", numba threads {c['numba_threads']}" if c.get("numba_threads") else ""))
    return "\n".join(lines)
