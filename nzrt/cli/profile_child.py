"""One row of ``nzrt profile``, in a process of its own: ``python -m nzrt.cli.profile_child ARGS.json``.

The parent (``nzrt.cli.profile.profile``) writes the arguments as JSON and reads the result as JSON
from the path named in them (``"result"``); nothing is read from this process's stdout. Memory
is measured against a **baseline** taken after the imports (torch, transformers and the model's
architecture module, nzrt) and the warm-up of nzrt's codec (a small tensor compressed and decompressed, so numba's code is loaded):

* peak: the maximum over the run of the RSS (anonymous and file-backed apart), sampled every
  ~5 ms by a thread, and the kernel's own high-water mark (VmHWM, reset to the current RSS by
  writing "5" to /proc/self/clear_refs where that is permitted), minus the baseline;
* steady: the RSS after the run (the model still loaded, garbage collected, the allocator
  trimmed), minus the baseline;
* device (CUDA): NVML's used memory (the whole device) and torch's peak allocated bytes, minus
  their values at the baseline (after the CUDA context exists).

Modes: "plain" (the dense model, ``model_arg.resolve(spec)``), "managed" (``model_arg.resolve(spec,
lazy=True)`` then ``nzrt.pretrained.manage_loaded``: ``nzrt.from_pretrained``'s path) and
"overhead" (only the warm-up's cost: the runtime's fixed overhead).
"""
from __future__ import annotations

import gc
import hashlib
import json
import os
import sys
import threading
import time
import traceback

from .. import osmem
from ..kernels import env as settings

SAMPLE_PERIOD_S = 0.005
MAX_SAMPLES = 1500  # kept for the plot (evenly thinned); the peaks use every sample


def _mem() -> dict:
    m = osmem.rss()
    return {k: m.get(k) for k in ("rss", "anon", "file", "peak")}


def _minus(a: dict, b: dict) -> dict:
    return {k: (a[k] - b[k] if a.get(k) is not None and b.get(k) is not None else None)
            for k in ("rss", "anon", "file")}


class DeviceMemory:
    """Device memory now: NVML's used bytes (the device torch runs on) and torch's allocator."""

    def __init__(self, device):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.tracker = None
        if self.cuda:
            from ..memory import MemoryTracker

            torch.zeros(1, device=self.device)  # the CUDA context, before the baseline
            self.tracker = MemoryTracker(self.device)
            self.tracker.device_stats()

    def now(self) -> tuple[int | None, int | None]:
        if not self.cuda:
            return None, None
        s = self.tracker.device_stats()
        return s.get("nvml_used"), s.get("torch_allocated")

    def reset_peak(self):
        if self.cuda:
            self.torch.cuda.synchronize(self.device)
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def torch_peak(self) -> int | None:
        return int(self.torch.cuda.max_memory_allocated(self.device)) if self.cuda else None

    @property
    def nvml_status(self) -> str:
        return self.tracker.nvml_status if self.tracker is not None else "no GPU in use (CPU device)"


class Sampler:
    """A thread that reads the RSS (and device memory) every ``period`` seconds; peaks of each."""

    def __init__(self, dev: DeviceMemory, period: float = SAMPLE_PERIOD_S):
        self.dev, self.period = dev, period
        self.samples: list = []  # [t_s, rss, anon, file, nvml_used, torch_allocated]
        self.peak = {"rss": 0, "anon": 0, "file": 0, "nvml": None, "torch": None}
        self._stop = threading.Event()
        self._thread = None
        self._t0 = 0.0

    def sample(self):
        m = osmem.rss()
        nv, ta = self.dev.now()
        row = [time.perf_counter() - self._t0, m.get("rss"), m.get("anon"), m.get("file"), nv, ta]
        self.samples.append(row)
        p = self.peak
        for i, k in ((1, "rss"), (2, "anon"), (3, "file"), (4, "nvml"), (5, "torch")):
            if row[i] is not None and (p[k] is None or row[i] > p[k]):
                p[k] = row[i]

    def _loop(self):
        while not self._stop.wait(self.period):
            self.sample()

    def start(self):
        self._t0 = time.perf_counter()
        self.sample()
        self._thread = threading.Thread(target=self._loop, name="nzrt-profile-sampler", daemon=True)
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._thread.join()
        self.sample()


def _thin(samples: list, n: int = MAX_SAMPLES) -> list:
    if len(samples) <= n:
        return samples
    step = len(samples) / n
    return [samples[int(i * step)] for i in range(n)] + [samples[-1]]


def _output_tensor(out):
    """The tensor to compare across runs: logits, else the last hidden state, else the first output."""
    import torch

    for key in ("logits", "last_hidden_state"):
        t = getattr(out, key, None)
        if isinstance(t, torch.Tensor):
            return t
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        return next(v for v in out.values() if isinstance(v, torch.Tensor))
    if isinstance(out, (tuple, list)):
        return next(v for v in out if isinstance(v, torch.Tensor))
    raise TypeError(f"the model returned {type(out).__name__}; no tensor to compare")


def int_view(t):
    """The bit pattern of a float tensor as integers (CPU, contiguous)."""
    import torch

    t = t.detach().to("cpu").contiguous()
    if t.is_floating_point():
        t = t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    return t


def _sync(dev: DeviceMemory):
    if dev.cuda:
        dev.torch.cuda.synchronize(dev.device)


def workload(lm, inputs, *, repeats: int, gen_tokens: int, dev: DeviceMemory) -> dict:
    """Forward passes (the first timed apart: under the runtime it records the trace), the first
    forward's output kept for the bit-identity check, and for a causal LM a short greedy generation."""
    import torch

    times, first = [], None
    with torch.no_grad():
        for _ in range(max(repeats, 1) + 1):
            _sync(dev)
            t = time.perf_counter()
            out = lm.model(**inputs) if isinstance(inputs, dict) else lm.model(*inputs)
            _sync(dev)
            times.append(time.perf_counter() - t)
            if first is None:
                first = int_view(_output_tensor(out))
            del out
        tps = prompt = None
        if lm.kind == "causal-lm" and gen_tokens > 0 and isinstance(inputs, dict):
            ids = inputs["input_ids"][:, :16]
            prompt = int(ids.shape[1])
            pad = getattr(lm.tokenizer, "eos_token_id", None) if lm.tokenizer is not None else None
            t = time.perf_counter()
            out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=gen_tokens,
                                    min_new_tokens=gen_tokens, do_sample=False, pad_token_id=pad)
            _sync(dev)
            tps = (out.shape[1] - ids.shape[1]) / (time.perf_counter() - t)
    # best of the repeats: other processes only ever add time (timeit's rule)
    return {"first_ms": 1e3 * times[0], "forward_ms": 1e3 * min(times[1:]), "tokens_per_s": tps,
            "prompt_tokens": prompt, "output": first}


def compare_output(out, args) -> dict:
    """Exact yes/no against the plain run's output (integer views), and how many elements differ."""
    import torch

    raw = out.numpy().tobytes()
    res = {"sha256": hashlib.sha256(raw).hexdigest(), "shape": list(out.shape), "dtype": str(out.dtype),
           "exact": None, "mismatches": None}
    path = args.get("logits_path")
    if not path:
        return res
    if args["mode"] == "plain":
        with open(path, "wb") as f:
            f.write(raw)
        return res
    if not os.path.exists(path):
        return res  # no plain run to compare with
    with open(path, "rb") as f:
        ref = f.read()
    res["exact"] = ref == raw
    if len(ref) == len(raw):
        a = torch.frombuffer(bytearray(ref), dtype=out.dtype).view(out.shape)
        res["mismatches"] = int((a != out).sum())
    else:
        res["mismatches"] = int(out.numel())
    return res


def _warm(device) -> None:
    """Load nzrt's codec the way a run does: compress + decompress a small tensor (CPU, and the
    device's backend on a GPU)."""
    import torch

    import nzrt

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(1 << 16, generator=g) * 0.02).to(torch.bfloat16)
    assert torch.equal(nzrt.decompress(nzrt.compress(x)).view(torch.int16), x.view(torch.int16))
    if str(device).startswith("cuda"):
        xd = x.to(device)
        nzrt.decompress(nzrt.compress(xd))
        torch.cuda.synchronize()


def _model_type(spec) -> str | None:
    """The transformers ``model_type`` of MODEL, read from its config only (no weights)."""
    from pathlib import Path

    from ..format.checkpoint import MAGIC
    from ..loading.entries import MODEL_META_KEY

    if spec is None or str(spec).strip().lower() in ("", "smollm2", "default"):
        return "llama"  # SmolLM2
    if str(spec).lower() == "minilm":
        return "bert"
    path = Path(spec).expanduser()
    try:
        if path.is_file() and path.name == "config.json":
            path = path.parent
        if path.is_dir() and (path / "config.json").is_file():
            with open(path / "config.json") as f:
                return json.load(f).get("model_type")
        if path.is_file():
            with open(path, "rb") as f:
                if f.read(8) != MAGIC:
                    return None
            from ..format.checkpoint import load_metadata

            info = load_metadata(path).get(MODEL_META_KEY) or {}
            return (info.get("config") or {}).get("model_type")
    except Exception:  # noqa: BLE001 - only a warm-up: the run itself reports a bad MODEL
        return None
    return None


def _import_transformers(spec) -> None:
    """Import transformers' model code before the baseline (for a Llama that is ~170 MiB of RSS:
    code and module objects, the same for every run and no part of the model's memory)."""
    import transformers
    import transformers.generation.utils  # noqa: F401
    import transformers.modeling_utils  # noqa: F401

    kind = _model_type(spec)
    if not kind:
        return
    from transformers.models.auto import modeling_auto

    for table in ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "MODEL_MAPPING_NAMES"):
        name = getattr(modeling_auto, table, {}).get(kind)
        if isinstance(name, (tuple, list)):
            name = name[0] if name else None
        if name:
            try:
                getattr(transformers, name)  # imports the architecture's module
            except Exception:  # noqa: BLE001
                pass


def _settle():
    gc.collect()
    osmem.settle()


def run(args: dict) -> dict:
    for p in reversed(args.get("sys_path") or []):
        if p not in sys.path:
            sys.path.insert(0, p)
    t_start = time.perf_counter()
    import torch

    from ..loading.transformers_dir import quiet_transformers
    from . import model_arg

    quiet_transformers()
    _import_transformers(args.get("spec"))

    mode, device = args["mode"], args.get("device") or "cpu"
    if args.get("threads"):
        torch.set_num_threads(int(args["threads"]))
    dev = DeviceMemory(device)  # on a GPU the CUDA context exists before any figure: it is torch's, not nzrt's
    _settle()
    before_warm = _mem()
    _warm(device)
    _settle()
    after_warm = _mem()
    res: dict = {"mode": mode, "pid": os.getpid(), "warmup": _minus(after_warm, before_warm),
                 "imports_rss": before_warm}
    if mode == "overhead":
        return res

    _settle()
    base = _mem()
    base_nvml, _ = dev.now()
    hwm_ok = osmem.reset_peak()
    dev.reset_peak()
    sampler = Sampler(dev)
    sampler.start()
    res["startup_s"] = time.perf_counter() - t_start
    policy, mantissa_bits = args.get("policy"), args.get("mantissa_bits")
    model = None
    try:
        t = time.perf_counter()
        if mode == "plain":
            lm = model_arg.resolve(args.get("spec"), dtype=args.get("dtype"))
            if lm.compressed is not None:
                lm.materialize()
            _check_mantissa_bits(mantissa_bits, lm)
            if device != "cpu":
                lm.model.to(device)
        else:
            from ..pretrained import manage_loaded

            lm = model_arg.resolve(args.get("spec"), dtype=args.get("dtype"), lazy=True)
            _check_mantissa_bits(mantissa_bits, lm)
            res["lazy"] = lm.on_meta
        res["load_s"] = time.perf_counter() - t
        res.update(name=lm.name or lm.source, kind=lm.kind, params=lm.num_params(),
                   dense_bytes=lm.dense_nbytes(), dtype=str(lm.dtype).removeprefix("torch."))
        if mode != "plain":
            t = time.perf_counter()
            model = manage_loaded(lm, policy=policy, budget=args.get("budget"), device=device,
                                  mantissa_bits=mantissa_bits)
            res["setup_s"] = time.perf_counter() - t
        inputs = model_arg.example_inputs(lm, tokens=int(args.get("tokens") or 128), device=device)
        res["tokens"] = (int(inputs["input_ids"].shape[1])
                         if isinstance(inputs, dict) and "input_ids" in inputs else 0)
        w = workload(lm, inputs, repeats=int(args.get("repeats", 3)), gen_tokens=int(args.get("gen_tokens", 6)),
                     dev=dev)
        res["output"] = compare_output(w.pop("output"), args)
        res.update(w)
        if mantissa_bits is not None:
            res["quality"] = _quality(lm, args, device)
        del inputs, w
        _settle()
        time.sleep(2 * SAMPLE_PERIOD_S)
        steady = _mem()
        steady_nvml, _ = dev.now()
        sampler.stop()
        hwm = _mem()["peak"] if hwm_ok else None
        p = sampler.peak
        peak_rss = max(x for x in (p["rss"], hwm) if x is not None)
        res["memory"] = {
            "baseline": {k: base[k] for k in ("rss", "anon", "file")},
            "peak": {"rss": peak_rss - base["rss"], "anon": _sub(p["anon"], base["anon"]),
                     "file": _sub(p["file"], base["file"]), "sampled_rss": p["rss"] - base["rss"],
                     "hwm_rss": _sub(hwm, base["rss"])},
            "steady": _minus(steady, base),
            "hwm_reset": hwm_ok,
            "device": {"nvml_peak": _sub(p["nvml"], base_nvml), "nvml_steady": _sub(steady_nvml, base_nvml),
                       "torch_peak": dev.torch_peak(), "nvml_status": dev.nvml_status} if dev.cuda else None,
        }
        res["samples"] = [[s[0], _sub(s[1], base["rss"]), _sub(s[4], base_nvml) or _sub(s[5], 0) or 0]
                          for s in _thin(sampler.samples)]
        if model is not None:
            import nzrt

            rep = nzrt.report(model)
            res["report"] = json.loads(rep.to_json()) if hasattr(rep, "to_json") else dict(rep)
            res["bits_per_weight"] = _bits_per_weight(lm, res["report"])
    finally:
        if sampler._thread is not None and not sampler._stop.is_set():
            sampler.stop()
        if model is not None:
            import nzrt

            nzrt.release(model)
    res["env"] = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                  "backend": settings.get("NZRT_BACKEND")}
    return res


def _sub(a, b):
    return a - b if a is not None and b is not None else None


def _check_mantissa_bits(k, lm):
    if k is None or lm.dtype is None:
        return
    from ..codec import check_mantissa_bits

    try:
        check_mantissa_bits(k, lm.dtype)
    except (TypeError, ValueError) as e:
        raise ValueError(f"--mantissa-bits {k} does not fit {lm.name or 'the model'}: {e}") from None


def _quality(lm, args, device) -> dict:
    """Perplexity (causal LMs) or the cosine of embeddings against the plain run's (saved to a file)."""
    import torch

    from .evaluate import quality

    path = args.get("quality_path")
    ref = None
    if args["mode"] != "plain" and path and os.path.exists(path):
        ref = {"embeddings": torch.load(path)}
    q = quality(lm, reference=ref, device=device)
    emb = q.pop("embeddings", None)
    if args["mode"] == "plain" and path and emb is not None:
        torch.save(emb.detach().cpu(), path)
    return q


def _bits_per_weight(lm, rep: dict) -> float | None:
    """Compressed bits per compressed weight, from the runtime's measured blob bytes."""
    t = rep.get("totals") or {}
    comp, dense = t.get("compressed_bytes"), t.get("dense_bytes")
    if not comp or not dense or lm.dtype is None:
        return None
    return 8.0 * comp / (dense / lm.dtype.itemsize)


def error_dict(e: BaseException) -> dict:
    return {"type": type(e).__name__, "module": type(e).__module__, "message": str(e),
            "needed": getattr(e, "needed", None), "traceback": traceback.format_exc()}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as f:
        args = json.load(f)
    try:
        res = run(args)
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent as data
        res = {"mode": args.get("mode"), "error": error_dict(e)}
    tmp = args["result"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, default=str)
    os.replace(tmp, args["result"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
