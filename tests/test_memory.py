"""MemoryTracker and budgets: host figures always, NVML only where a GPU is (faked here)."""
import subprocess
import sys
import types

import pytest
import torch

from nzrt.budget import format_bytes, parse_budget
from nzrt.memory import MemoryTracker, storage_bytes


def test_import_initialises_nothing():
    code = ("import pynvml, torch\n"
            "calls = []\n"
            "pynvml.nvmlInit = lambda *a: calls.append(1)\n"  # torch imports pynvml itself; nobody may init it
            "import nzrt, nzrt.memory, nzrt.budget, nzrt.reports, nzrt.runtime, nzrt.scheduler\n"
            "nzrt.memory.MemoryTracker('cpu').sample()\n"
            "assert not calls and not torch.cuda.is_initialized()\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    code = "import sys, nzrt; assert 'torch' not in sys.modules and 'numba' not in sys.modules; nzrt.managed"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cpu_tracker_says_no_gpu_and_samples_host():
    t = MemoryTracker("cpu")
    snap = t.sample()
    assert snap["host_rss"] > 0 and snap["host_available"] > 0
    assert "no GPU" in t.nvml_status and "nvml_used" not in snap
    assert t.peaks["host_rss"] >= snap["host_rss"] > 0
    assert t.free_bytes() > 0
    t.close()


class _FakeNVML(types.ModuleType):
    class NVMLError(Exception):
        pass

    def __init__(self, uuids, fail=False):
        super().__init__("pynvml")
        self.uuids = uuids
        self.fail = fail
        self.inited = 0
        self.nvmlMemory_v2 = object()

    def nvmlInit(self):
        if self.fail:
            raise self.NVMLError("NVML Shared Library Not Found")
        self.inited += 1

    def nvmlShutdown(self):
        self.inited -= 1

    def nvmlDeviceGetCount(self):
        return len(self.uuids)

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetUUID(self, h):
        return self.uuids[h]

    def nvmlDeviceGetMemoryInfo(self, h, version=None):
        assert version is self.nvmlMemory_v2  # the v2 structure (it has `reserved`)
        return types.SimpleNamespace(total=80 << 30, free=(70 << 30) - h, used=(10 << 30) + h,
                                     reserved=512 << 20)


def _cuda_tracker(monkeypatch, fake, uuid):
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda d: types.SimpleNamespace(uuid=uuid))
    t = MemoryTracker.__new__(MemoryTracker)
    MemoryTracker.__init__(t, "cpu")  # no CUDA here: build for the CPU, then point it at cuda:1
    t.device = torch.device("cuda", 1)
    t.nvml_status = "not sampled yet"
    return t


def test_nvml_matched_by_uuid(monkeypatch):
    fake = _FakeNVML(["GPU-aaaa-0000", "GPU-bbbb-1111"])
    t = _cuda_tracker(monkeypatch, fake, "bbbb-1111")  # torch's uuid has no "GPU-" prefix
    snap = t.sample()
    assert t.nvml_status == "ok"
    assert snap["nvml_used"] == (10 << 30) + 1 and snap["nvml_reserved"] == 512 << 20  # device 1, not 0
    assert t.free_bytes() == (70 << 30) - 1
    t.close()
    assert fake.inited == 0


def test_nvml_missing_or_unmatched_is_reported(monkeypatch):
    t = _cuda_tracker(monkeypatch, _FakeNVML(["GPU-x"], fail=True), "x")
    snap = t.sample()
    assert "NVML unavailable" in t.nvml_status and "nvml_used" not in snap and snap["host_rss"] > 0
    t = _cuda_tracker(monkeypatch, _FakeNVML(["GPU-other"]), "mine")
    snap = t.sample()
    assert "no device matches" in t.nvml_status and "nvml_used" not in snap


def test_storage_bytes_counts_each_storage_once():
    a = torch.zeros(1000)
    views = [a, a[10:], a.view(10, 100)]
    assert storage_bytes(views) == 4000
    assert storage_bytes([a, torch.zeros(10, dtype=torch.bfloat16)]) == 4020
    assert storage_bytes([torch.empty(5, device="meta")]) == 0


def test_parse_budget():
    assert parse_budget(None) is None
    assert parse_budget(1234) == 1234
    assert parse_budget("6GiB") == 6 * 2 ** 30
    assert parse_budget("1.5 GB") == 1_500_000_000
    assert parse_budget("512mib") == 512 * 2 ** 20
    assert parse_budget("80%", 1000) == 800
    assert parse_budget("50%", lambda: 4096) == 2048
    for bad in ("six gigs", "-1GB", "0", "120%", "5 parsecs"):
        with pytest.raises(ValueError):
            parse_budget(bad, 100)
    with pytest.raises(ValueError, match="free memory"):
        parse_budget("10%")
    assert format_bytes(3 * 2 ** 30) == "3.00 GiB" and format_bytes(12) == "12 B"
