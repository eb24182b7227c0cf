"""``nzrt profile``: run a model plainly and under each policy, side by side.

One row per run: bits/weight, memory held by weights, peak device and host memory, forward time
(and tokens/s for causal LMs), the decode / transfer / stall split summed over layers, the speed
relative to the plain model and, with ``mantissa_bits``, quality against the lossless model.
"""
from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

DEFAULT_POLICIES = ("resident", "offload", "belady", "auto")

Progress = Callable[[int, int, str], None]


@dataclass
class Row:
    run: str  # "plain" or the policy name
    ok: bool = True
    error: str | None = None
    bits_per_weight: float | None = None
    weights_bytes: int | None = None  # memory held by the weights during the run
    peak_device_bytes: int | None = None
    peak_host_bytes: int | None = None
    setup_s: float | None = None  # entering managed(): compression, placement
    first_forward_ms: float | None = None  # the first forward (traced) under the runtime
    forward_ms: float | None = None  # best of the later forwards
    tokens_per_s: float | None = None
    decode_ms: float | None = None
    transfer_ms: float | None = None
    stall_ms: float | None = None
    speed_vs_plain: float | None = None  # plain forward time / this forward time
    quality: dict | None = None
    plan: str | None = None


@dataclass
class ProfileResult:
    model: str
    device: str
    params: int
    dense_bytes: int
    tokens: int
    gen_tokens: int
    mantissa_bits: int | None
    budget: Any
    rows: list[Row] = field(default_factory=list)
    reports: dict = field(default_factory=dict)  # run -> the runtime report (JSON dict)
    memory: dict = field(default_factory=dict)  # run -> [[t_s, host_bytes, device_bytes], ...]
    environment: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, default=str)


# -- measurement helpers -----------------------------------------------------------------------
class MemorySampler:
    """Samples host RSS (psutil) and, on CUDA, torch's allocated bytes every ``period`` seconds."""

    def __init__(self, device=None, period: float = 0.01):
        import psutil

        self.proc = psutil.Process()
        self.period = period
        self.cuda = device is not None and str(device).startswith("cuda")
        self.samples: list[list[float]] = []
        self._stop = threading.Event()
        self._t0 = 0.0
        self._thread = None

    def _sample(self):
        dev = 0
        if self.cuda:
            import torch

            dev = torch.cuda.memory_allocated()
        self.samples.append([time.perf_counter() - self._t0, self.proc.memory_info().rss, dev])

    def _loop(self):
        while not self._stop.wait(self.period):
            self._sample()

    def __enter__(self):
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        self._t0 = time.perf_counter()
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="nzrt-memory-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()
        return False

    @property
    def peak_host(self) -> int:
        return int(max(s[1] for s in self.samples))

    @property
    def peak_device(self) -> int | None:
        if not self.cuda:
            return None
        import torch

        return int(max(max(s[2] for s in self.samples), torch.cuda.max_memory_allocated()))


def _sync(device):
    if device is not None and str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def run_workload(lm, inputs, *, repeats: int, gen_tokens: int, device=None) -> dict:
    """Forward passes (the first timed apart: under the runtime it records the trace) and, for a
    causal LM, a short greedy generation."""
    import torch

    times = []
    with torch.no_grad():
        for _ in range(max(repeats, 1) + 1):
            _sync(device)
            t = time.perf_counter()
            if isinstance(inputs, dict):
                lm.model(**inputs)
            else:
                lm.model(*inputs)
            _sync(device)
            times.append(time.perf_counter() - t)
        tps = None
        if lm.kind == "causal-lm" and gen_tokens > 0 and isinstance(inputs, dict):
            ids = inputs["input_ids"][:, :16]
            pad = getattr(lm.tokenizer, "eos_token_id", None) if lm.tokenizer is not None else None
            t = time.perf_counter()
            out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=gen_tokens,
                                    min_new_tokens=gen_tokens, do_sample=False, pad_token_id=pad)
            _sync(device)
            tps = (out.shape[1] - ids.shape[1]) / (time.perf_counter() - t)
    # best of the repeats: other processes only ever add time (timeit's rule)
    return {"first_ms": 1e3 * times[0], "forward_ms": 1e3 * min(times[1:]),
            "tokens_per_s": tps}


def _num(d: dict, *keys, default=None):
    for k in keys:
        if isinstance(d, dict) and d.get(k) is not None:
            return d[k]
    return default


def summarize_report(rep: dict, itemsize: int = 2) -> dict:
    """Totals from a runtime report (``json.loads(run.report().to_json())``)."""
    t = rep.get("totals") or {}
    out = {k + "_ms": (1e3 * t[k + "_s"] if t.get(k + "_s") is not None else None)
           for k in ("decode", "transfer", "stall")}
    comp, dense = t.get("compressed_bytes"), t.get("dense_bytes")
    out["compressed_bytes"], out["dense_bytes"] = comp, dense
    out["bits_per_weight"] = 8.0 * comp / (dense / itemsize) if comp and dense else None
    held = rep.get("held") or {}
    if held:
        # what the weights need while the model runs: compressed blobs (not counting a
        # memory-mapped file), the peak of the dense slots, parameters left uncompressed
        out["weights_bytes"] = (held.get("compressed_device", 0) + held.get("compressed_host", 0)
                                + max(held.get("dense_slots", 0), rep.get("runtime_peak_dense") or 0)
                                + held.get("uncompressed", 0))
        out["restore_bytes"] = held.get("restore_copies")
    else:
        out["weights_bytes"] = None
    peaks = rep.get("peaks") or {}
    out["peak_host_bytes"] = peaks.get("host_rss")
    out["peak_device_bytes"] = peaks.get("nvml_used") or peaks.get("torch_max_allocated") \
        or peaks.get("torch_allocated")
    out["plan"] = rep.get("plan")
    return out


def layer_phases(rep: dict) -> list[tuple[str, float, float, float]]:
    """(layer, decode_ms, transfer_ms, stall_ms) for every layer of a report."""
    layers = _num(rep, "layers", "units", default=[]) or []
    if isinstance(layers, dict):
        layers = [dict(v, name=k) for k, v in layers.items()]
    out = []
    for layer in layers:
        vals = [_num(layer, *keys) or 0.0 for keys in (("decode_s", "decode_seconds", "decode"),
                                                      ("transfer_s", "transfer_seconds", "transfer", "h2d_s"),
                                                      ("stall_s", "stall_seconds", "stall"))]
        out.append((str(_num(layer, "name", "unit", default="?")), *(1e3 * float(v) for v in vals)))
    return out


def available_policies() -> tuple[str, ...]:
    try:
        from .policies import POLICIES
    except ImportError:
        return DEFAULT_POLICIES
    return tuple(p for p in DEFAULT_POLICIES if p in POLICIES)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _plain_run(lm, inputs, res, *, device, repeats, gen_tokens, mantissa_bits):
    """The plain dense model: one row, and the reference quality when asked."""
    import torch

    from .evaluate import quality

    had_compressed = lm.compressed is not None
    if had_compressed:
        lm.materialize()
    orig_device = next(iter(lm.model.parameters())).device
    if device != "cpu":
        lm.model.to(device)
    ref_quality = None
    try:
        with MemorySampler(device) as mem:
            w = run_workload(lm, inputs, repeats=repeats, gen_tokens=gen_tokens, device=device)
            if mantissa_bits is not None:
                ref_quality = quality(lm, device=device)
    finally:
        if device != "cpu":
            lm.model.to(orig_device)
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        if had_compressed:
            # back to the meta model, so the runtime gets the memory-mapped compressed weights
            lm.dematerialize()
            import gc

            gc.collect()
    row = Row("plain", bits_per_weight=8.0 * (lm.dense_nbytes() / max(lm.num_params(), 1)),
              weights_bytes=lm.dense_nbytes(), peak_device_bytes=mem.peak_device,
              peak_host_bytes=mem.peak_host, first_forward_ms=w["first_ms"], forward_ms=w["forward_ms"],
              tokens_per_s=w["tokens_per_s"], speed_vs_plain=1.0)
    if ref_quality is not None:
        row.quality = {k: v for k, v in ref_quality.items() if k != "embeddings"}
    res.rows.append(row)
    res.memory["plain"] = mem.samples
    return row, ref_quality


# -- the profile -------------------------------------------------------------------------------
def profile(lm, *, policies=None, budget=None, device=None, mantissa_bits: int | None = None,
            tokens: int = 128, repeats: int = 3, gen_tokens: int = 6, plain: bool = True,
            progress: Progress | None = None) -> ProfileResult:
    """Run ``lm`` (a models.LoadedModel) plainly, then under each policy."""
    import torch

    from . import models
    from .evaluate import quality

    device = str(device or default_device())
    policies = list(policies or available_policies())
    steps = int(plain) + len(policies)
    done = 0

    def tick(what):
        nonlocal done
        if progress:
            progress(done, steps, what)

    res = ProfileResult(model=lm.name or lm.source, device=device, params=lm.num_params(),
                        dense_bytes=lm.dense_nbytes(), tokens=tokens, gen_tokens=gen_tokens,
                        mantissa_bits=mantissa_bits, budget=budget)
    res.environment = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                       "cores": os.cpu_count(), "backend": os.environ.get("NZRT_BACKEND"),
                       "load_average_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    inputs = models.example_inputs(lm, tokens=tokens, device=device)
    res.tokens = int(inputs["input_ids"].shape[1]) if isinstance(inputs, dict) and "input_ids" in inputs else 0

    # plain: the dense model (a .nzrt is decoded whole for this baseline only)
    ref_quality = None
    plain_row = None
    if plain:
        tick("plain")
        plain_row, ref_quality = _plain_run(lm, inputs, res, device=device, repeats=repeats,
                                            gen_tokens=gen_tokens, mantissa_bits=mantissa_bits)
    elif mantissa_bits is not None:
        raise ValueError("--mantissa-bits measures quality against the plain model; drop --no-plain")
    done += int(plain)

    budget_errors = []
    for policy in policies:
        tick(str(policy))
        row = Row(str(policy))
        try:
            with MemorySampler(device) as mem:
                t = time.perf_counter()
                with models.managed(lm, policy=policy, budget=budget, mantissa_bits=mantissa_bits,
                                    device=device) as run:
                    row.setup_s = time.perf_counter() - t
                    w = run_workload(lm, inputs, repeats=repeats, gen_tokens=gen_tokens, device=device)
                    if mantissa_bits is not None:
                        q = quality(lm, reference=ref_quality, device=device)
                        row.quality = {k: v for k, v in q.items() if k != "embeddings"}
                    rep = run.report()
            repd = json.loads(rep.to_json()) if hasattr(rep, "to_json") else dict(rep)
            res.reports[row.run] = repd
            s = summarize_report(repd, itemsize=lm.dtype.itemsize if lm.dtype is not None else 2)
            row.first_forward_ms, row.forward_ms, row.tokens_per_s = w["first_ms"], w["forward_ms"], w["tokens_per_s"]
            row.speed_vs_plain = plain_row.forward_ms / w["forward_ms"] if plain_row and w["forward_ms"] else None
            row.bits_per_weight = _bits_per_weight(lm, repd) or s.get("bits_per_weight")
            row.weights_bytes = s.get("weights_bytes")
            if lm.compressed is not None:
                # weights from a memory-mapped .nzrt: count the blobs themselves (a slice of a mapped
                # file would otherwise be counted as the whole file's storage)
                held = repd.get("held") or {}
                row.weights_bytes = (sum(v.nbytes if hasattr(v, "header") else v.numel() * v.element_size()
                                         for v in lm.compressed.values())
                                     + max(held.get("dense_slots", 0), repd.get("runtime_peak_dense") or 0))
            row.peak_device_bytes = s.get("peak_device_bytes") or mem.peak_device
            row.peak_host_bytes = max(filter(None, [s.get("peak_host_bytes"), mem.peak_host]))
            row.decode_ms, row.transfer_ms, row.stall_ms = s.get("decode_ms"), s.get("transfer_ms"), s.get("stall_ms")
            row.plan = s.get("plan")
            res.memory[row.run] = mem.samples
        except Exception as e:  # a policy that does not fit the budget is a row, not a failure
            from .policies import BudgetError

            if not isinstance(e, BudgetError) and not _is_budget_error(e):
                raise
            row.ok, row.error = False, str(e).splitlines()[0]
            budget_errors.append(e)
        res.rows.append(row)
        done += 1
    if progress:
        progress(done, steps, "done")
    if budget_errors and len(budget_errors) == len(policies):
        # nothing fits: the smallest budget any policy needs
        raise min(budget_errors, key=lambda e: getattr(e, "needed", float("inf")))
    return res


def _bits_per_weight(lm, rep: dict) -> float | None:
    """Compressed bits per compressed weight, from measured blob bytes (tied weights once)."""
    try:
        from .runtime import DEFAULT_MIN_NUMEL
    except ImportError:  # pragma: no cover
        DEFAULT_MIN_NUMEL = 2048
    params = [(n, p) for n, p in lm.model.named_parameters()
              if p.is_floating_point() and p.numel() >= DEFAULT_MIN_NUMEL]
    numel = sum(p.numel() for _, p in params)
    if lm.compressed is not None:
        blobs = sum(lm.compressed[n].nbytes for n, _ in params
                    if n in lm.compressed and hasattr(lm.compressed[n], "header"))
    else:
        held = rep.get("held") or {}
        blobs = held.get("compressed_device", 0) + held.get("compressed_host", 0)
    return 8.0 * blobs / numel if blobs and numel else None


def _is_budget_error(e: Exception) -> bool:
    return type(e).__name__ == "BudgetError" or hasattr(e, "needed")


# -- output ------------------------------------------------------------------------------------
def _mb(n) -> str:
    if n is None:
        return "-"
    m = n / 2**20
    return f"{m:,.0f}" if m >= 100 else f"{m:.1f}" if m >= 1 else f"{m:.3f}"


def _f(x, fmt="{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def format_table(res: ProfileResult) -> str:
    q_head = ""
    metric = next((r.quality.get("metric") for r in res.rows if r.quality), None)
    if metric:
        q_head = f" {'ppl' if metric == 'perplexity' else 'cosine':>8}"
    head = (f"{'run':<10} {'bits/w':>6} {'weights MiB':>11} {'peak dev MiB':>12} {'peak host MiB':>13} "
            f"{'fwd ms':>8} {'tok/s':>6} {'decode ms':>9} {'xfer ms':>7} {'stall ms':>8} {'speed':>6}{q_head}")
    title = (f"{res.model} on {res.device}: {res.params:,} parameters, {_mb(res.dense_bytes)} MiB dense; "
             + (f"forward = {res.tokens} tokens" if res.tokens else "forward = the example inputs"))
    if any(r.tokens_per_s for r in res.rows):
        title += f", tok/s = greedy generation of {res.gen_tokens} tokens"
    if res.mantissa_bits is not None:
        title += f"; mantissa bits {res.mantissa_bits}"
    if res.budget:
        title += f"; budget {res.budget}"
    lines = [title, head, "-" * len(head)]
    for r in res.rows:
        if not r.ok:
            lines.append(f"{r.run:<10} does not fit: {r.error}")
            continue
        q = ""
        if q_head:
            v = r.quality.get("value") if r.quality else None
            q = f" {_f(v, '{:.4f}' if metric == 'cosine' else '{:.3f}'):>8}"
        lines.append(f"{r.run:<10} {_f(r.bits_per_weight, '{:.2f}'):>6} {_mb(r.weights_bytes):>11} "
                     f"{_mb(r.peak_device_bytes):>12} {_mb(r.peak_host_bytes):>13} {_f(r.forward_ms):>8} "
                     f"{_f(r.tokens_per_s):>6} {_f(r.decode_ms):>9} {_f(r.transfer_ms):>7} {_f(r.stall_ms):>8} "
                     f"{_f(r.speed_vs_plain, '{:.2f}x'):>6}{q}")
    lines.append("fwd ms: best of the forwards after the first (which records the trace); decode/xfer/stall: "
                 "summed over layers for the whole run; speed: plain forward time / this one")
    load, cores = res.environment.get("load_average_at_start"), res.environment.get("cores") or 1
    if res.device == "cpu" and load is not None and load > 0.5 * cores:
        lines.append(f"note: other work was running (load average {load:.1f} on {cores} cores): CPU timings, "
                     f"the plain model's most of all, are unreliable; profile on an idle machine")
    return "\n".join(lines)


def plot(res: ProfileResult, path) -> None:
    """PNG: memory over time for every run; per-layer decode / transfer / stall time per policy."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    managed = [r.run for r in res.rows[1:] if r.ok and res.reports.get(r.run)]
    n = 1 + max(len(managed), 1)
    fig, axes = plt.subplots(n, 1, figsize=(11, 3.2 * n), squeeze=False)
    ax = axes[0][0]
    for run, samples in res.memory.items():
        if samples:
            ax.plot([s[0] for s in samples], [s[1] / 2**20 for s in samples], label=f"{run} host")
            if any(s[2] for s in samples):
                ax.plot([s[0] for s in samples], [s[2] / 2**20 for s in samples], "--", label=f"{run} device")
    ax.set_xlabel("seconds since the run started")
    ax.set_ylabel("MiB")
    ax.set_title(f"{res.model} on {res.device}: memory over time")
    ax.legend(fontsize=7, ncol=2)
    for i, run in enumerate(managed or [None]):
        ax = axes[i + 1][0]
        if run is None:
            ax.text(0.5, 0.5, "no managed run", ha="center", va="center")
            continue
        phases = layer_phases(res.reports[run])
        xs = range(len(phases))
        dec = [p[1] for p in phases]
        xfer = [p[2] for p in phases]
        stall = [p[3] for p in phases]
        ax.bar(xs, dec, label="decode", color="tab:blue")
        ax.bar(xs, xfer, bottom=dec, label="transfer", color="tab:orange")
        ax.bar(xs, stall, bottom=[a + b for a, b in zip(dec, xfer)], label="stall", color="tab:red")
        tops = sorted(a + b + c for a, b, c in zip(dec, xfer, stall))
        if tops and tops[-1] > 10 * max(tops[int(0.98 * (len(tops) - 1))], 1e-9):
            lim = 1.5 * tops[int(0.98 * (len(tops) - 1))]  # one outlier (a JIT compile, say): clip it
            ax.set_ylim(0, lim)
            i_max = max(range(len(tops)), key=lambda i: dec[i] + xfer[i] + stall[i])
            ax.annotate(f"{tops[-1]:.0f} ms", (i_max, lim), xytext=(5, -12), textcoords="offset points",
                        fontsize=7)
        ax.set_ylabel("ms (whole run)")
        ax.set_title(f"{run}: time per layer by phase")
        ax.set_xlabel("layer (in the runtime's report order)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
