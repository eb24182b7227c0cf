"""``nzrt profile``: run a model plainly and under each policy, side by side.

Every row (the plain model, then each policy) runs in a process of its own
(``nzrt.cli.profile_child``), so its memory is its own: peak and steady RSS, anonymous and
file-backed apart, each minus a baseline taken in that process after the imports and the codec's
warm-up; device memory from NVML (and torch's allocator) on a GPU, minus its baseline. The
warm-up's own cost (numba and nzrt's compiled codec: paid once per process, whatever the model)
is measured once in a child of its own and shown on a line of its own: the runtime's fixed
overhead. Each managed row's output (the logits of one forward) is compared with the plain row's
as integers: ``exact`` is bit identity, not closeness. Also per row: bits/weight, memory held by
weights, forward time, tokens/s (with the prompt length), the decode / transfer / stall split
summed over layers, the speed relative to the plain model and, with ``mantissa_bits``, quality.
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..kernels import env as settings

DEFAULT_POLICIES = ("resident", "offload", "belady", "auto")

Progress = Callable[[int, int, str], None]


@dataclass
class Row:
    run: str  # "plain" or the policy name
    ok: bool = True
    error: str | None = None
    bits_per_weight: float | None = None
    weights_bytes: int | None = None  # memory held by the weights during the run
    peak_device_bytes: int | None = None  # NVML (whole device) minus its baseline, else torch's peak
    # this run's own host memory (its own process), minus the baseline after imports + warm-up
    peak_host_bytes: int | None = None  # RSS: max of the ~5 ms samples and VmHWM
    peak_anon_bytes: int | None = None
    peak_file_bytes: int | None = None
    steady_host_bytes: int | None = None  # RSS after the run, the model still loaded
    steady_anon_bytes: int | None = None
    steady_file_bytes: int | None = None
    load_s: float | None = None  # loading the model (for a managed row: as far as a meta model)
    setup_s: float | None = None  # entering the runtime: compression, placement
    first_forward_ms: float | None = None  # the first forward (traced) under the runtime
    forward_ms: float | None = None  # best of the later forwards
    tokens_per_s: float | None = None
    prompt_tokens: int | None = None  # the prompt the tokens/s generation started from
    decode_ms: float | None = None
    transfer_ms: float | None = None
    stall_ms: float | None = None
    speed_vs_plain: float | None = None  # plain forward time / this forward time
    exact: bool | None = None  # the first forward's output bit-identical to the plain run's
    mismatches: int | None = None  # elements that differ from the plain run's output
    output_sha256: str | None = None  # of the output's integer view
    quality: dict | None = None
    plan: str | None = None
    wall_s: float | None = None  # the child process, start to end


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
    prompt_tokens: int | None = None
    rows: list[Row] = field(default_factory=list)
    reports: dict = field(default_factory=dict)  # run -> the runtime report (JSON dict)
    memory: dict = field(default_factory=dict)  # run -> [[t_s, host_bytes, device_bytes], ...] above baseline
    details: dict = field(default_factory=dict)  # run -> the child's memory figures (baselines, VmHWM ...)
    fixed_overhead: dict | None = None  # the codec's warm-up: {"rss", "anon", "file"} bytes
    environment: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, default=str)


# -- reading the runtime's report -------------------------------------------------------------
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
        # what the weights need while the model runs: compressed blobs (a memory-mapped file's
        # by their own bytes, not the whole map), the peak of the dense slots, parameters left uncompressed
        out["weights_bytes"] = (held.get("compressed_device", 0) + held.get("compressed_host", 0)
                                + held.get("compressed_mapped", 0)
                                + max(held.get("dense_slots", 0), rep.get("runtime_peak_dense") or 0)
                                + held.get("uncompressed", 0))
        out["restore_bytes"] = held.get("restore_copies_on_disk")
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
        from ..policies import POLICIES
    except ImportError:
        return DEFAULT_POLICIES
    return tuple(p for p in DEFAULT_POLICIES if p in POLICIES)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# -- running the rows, each in a child process ---------------------------------------------------
class ChildError(RuntimeError):
    """A profile child process that ended without a result (crashed, killed, out of memory)."""


_ROOT = Path(__file__).resolve().parents[2]  # the source checkout (editable install): nzrt/cli/ up two


def _child_sys_path() -> list:
    """The parent's import path for a child, without the project root: there, its kernels/ would
    shadow Hugging Face's `kernels` package, which transformers imports (the editable install makes
    nzrt importable without it)."""
    out = []
    for p in sys.path:
        if p and os.path.isdir(p) and Path(p).resolve() != _ROOT:
            out.append(p)
    return out


def run_child(args: dict, workdir: str, timeout: float | None = None) -> dict:
    """Run one row in ``python -m nzrt.cli.profile_child``; its result as a dict (``"error"`` when the
    row raised: rebuilt by ``child_error``)."""
    tag = f"{args['mode']}-{args.get('policy') or ''}-{time.perf_counter_ns()}"
    args = dict(args, result=os.path.join(workdir, f"result-{tag}.json"),
                sys_path=_child_sys_path())
    arg_path = os.path.join(workdir, f"args-{tag}.json")
    with open(arg_path, "w") as f:
        json.dump(args, f)
    t = time.perf_counter()
    # run in workdir: `-m` puts the working directory on sys.path, and it must not be the root
    p = subprocess.run([sys.executable, "-m", "nzrt.cli.profile_child", arg_path], cwd=workdir,
                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=timeout)
    wall = time.perf_counter() - t
    try:
        with open(args["result"]) as f:
            res = json.load(f)
    except (OSError, ValueError):
        tail = (p.stderr or b"").decode(errors="replace").strip().splitlines()[-15:]
        why = f"exit code {p.returncode}" if p.returncode >= 0 else f"killed by signal {-p.returncode}"
        if p.returncode in (-9, 137):
            why += " (out of memory?)"
        raise ChildError(f"the profile's {args['mode']} {args.get('policy') or ''} run ended without a "
                         f"result ({why})" + ("; its last output:\n" + "\n".join(tail) if tail else "")) from None
    res["wall_s"] = wall
    return res


def child_error(err: dict) -> BaseException:
    """The child's exception, rebuilt in this process (same class where it can be imported, the
    message, ``needed`` for budget errors); its traceback is attached as a note."""
    name, module, msg = err.get("type") or "Error", err.get("module") or "builtins", err.get("message") or ""
    e = None
    if name == "BudgetError":
        from ..policies import BudgetError

        e = BudgetError(msg, int(err.get("needed") or 0))
    else:
        try:
            cls = getattr(importlib.import_module(module), name)
            if isinstance(cls, type) and issubclass(cls, BaseException):
                e = cls(msg)
        except Exception:  # noqa: BLE001 - any failure: the generic stand-in below
            e = None
    if e is None:
        e = type(name, (RuntimeError,), {"__module__": module})(msg)
    if err.get("needed") is not None and not hasattr(e, "needed"):
        e.needed = err["needed"]
    if err.get("traceback") and hasattr(e, "add_note"):
        e.add_note("in the profile's child process:\n" + err["traceback"].rstrip())
    return e


def _is_budget_error(e: BaseException) -> bool:
    return type(e).__name__ == "BudgetError" or hasattr(e, "needed")


def _fill_row(row: Row, r: dict, res: ProfileResult, plain_row: Row | None) -> None:
    mem = r.get("memory") or {}
    peak, steady = mem.get("peak") or {}, mem.get("steady") or {}
    row.peak_host_bytes, row.peak_anon_bytes, row.peak_file_bytes = peak.get("rss"), peak.get("anon"), peak.get("file")
    row.steady_host_bytes, row.steady_anon_bytes, row.steady_file_bytes = (steady.get("rss"), steady.get("anon"),
                                                                            steady.get("file"))
    dev = mem.get("device") or {}
    row.peak_device_bytes = dev.get("nvml_peak") if dev.get("nvml_peak") is not None else dev.get("torch_peak")
    row.load_s, row.setup_s, row.wall_s = r.get("load_s"), r.get("setup_s"), r.get("wall_s")
    row.first_forward_ms, row.forward_ms = r.get("first_ms"), r.get("forward_ms")
    row.tokens_per_s, row.prompt_tokens = r.get("tokens_per_s"), r.get("prompt_tokens")
    out = r.get("output") or {}
    row.exact, row.mismatches, row.output_sha256 = out.get("exact"), out.get("mismatches"), out.get("sha256")
    if plain_row is not None and plain_row.forward_ms and row.forward_ms:
        row.speed_vs_plain = plain_row.forward_ms / row.forward_ms
    if r.get("quality"):
        row.quality = r["quality"]
    res.memory[row.run] = r.get("samples") or []
    res.details[row.run] = dict(mem, startup_s=r.get("startup_s"), warmup=r.get("warmup"), lazy=r.get("lazy"),
                                pid=r.get("pid"))
    rep = r.get("report")
    if rep:
        res.reports[row.run] = rep
        itemsize = {"float32": 4, "float64": 8}.get(r.get("dtype"), 2)
        s = summarize_report(rep, itemsize=itemsize)
        row.bits_per_weight = r.get("bits_per_weight") or s.get("bits_per_weight")
        row.weights_bytes = s.get("weights_bytes")
        row.decode_ms, row.transfer_ms, row.stall_ms = s.get("decode_ms"), s.get("transfer_ms"), s.get("stall_ms")
        row.plan = s.get("plan")
    else:  # the plain model: dense weights
        row.bits_per_weight = 8.0 * r["dense_bytes"] / max(r["params"], 1) if r.get("params") else None
        row.weights_bytes = r.get("dense_bytes")
    if not res.params and r.get("params"):
        res.model, res.params, res.dense_bytes = r.get("name") or res.model, r["params"], r.get("dense_bytes") or 0
        res.tokens = r.get("tokens") or 0
    if res.prompt_tokens is None:
        res.prompt_tokens = r.get("prompt_tokens")


# -- the profile -------------------------------------------------------------------------------
def profile(model=None, *, dtype=None, policies=None, budget=None, device=None, mantissa_bits: int | None = None,
            tokens: int = 128, repeats: int = 3, gen_tokens: int = 6, plain: bool = True,
            overhead: bool = True, progress: Progress | None = None, timeout: float | None = None) -> ProfileResult:
    """Run ``model`` plainly, then under each policy, each run in a child process of its own.

    ``model``: a MODEL spec (``model_arg.resolve``'s: a path, 'minilm', package.module:factory, None
    for the embedded SmolLM2) or a ``LoadedModel`` (its ``source`` is loaded again in each
    child). The plain row loads it as ``model_arg.resolve(spec, dtype=dtype)`` (dense); a managed row
    as ``nzrt.from_pretrained`` does (``resolve(..., lazy=True)`` then ``manage_loaded``).
    ``overhead``: also measure the runtime's fixed overhead in a child of its own.
    ``progress(done, total, what)`` is called as each run starts and as it ends.
    """
    spec = model
    if isinstance(model, str):
        from .model_arg import check_spec

        spec = check_spec(model)  # before any run starts; a path made absolute for the children
    elif model is not None:
        spec = getattr(model, "source", None) or None
        if dtype is None and getattr(model, "dtype", None) is not None:
            dtype = str(model.dtype).removeprefix("torch.")
    if dtype is not None and not isinstance(dtype, str):
        dtype = str(dtype).removeprefix("torch.")
    device = str(device or default_device())
    policies = [str(p) for p in (policies or available_policies())]
    if mantissa_bits is not None and not plain:
        raise ValueError("--mantissa-bits measures quality against the plain model; drop --no-plain")
    steps = int(plain) + len(policies) + int(overhead)
    done = 0

    def tick(what):
        if progress:
            progress(done, steps, what)

    res = ProfileResult(model=str(spec or "SmolLM2-135M-Instruct"), device=device, params=0, dense_bytes=0,
                        tokens=tokens, gen_tokens=gen_tokens, mantissa_bits=mantissa_bits, budget=budget)
    import torch

    res.environment = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                       "cores": os.cpu_count(), "backend": settings.get("NZRT_BACKEND"),
                       "isolation": "one child process per run",
                       "load_average_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    common = {"spec": spec, "dtype": dtype, "device": device, "mantissa_bits": mantissa_bits, "tokens": tokens,
              "repeats": repeats, "gen_tokens": gen_tokens, "budget": budget}
    with tempfile.TemporaryDirectory(prefix="nzrt-profile-") as work:
        common["logits_path"] = os.path.join(work, "plain-output.bin")
        common["quality_path"] = os.path.join(work, "plain-embeddings.pt")
        plain_row = None
        if plain:
            tick("plain: started")
            r = run_child(dict(common, mode="plain"), work, timeout)
            if "error" in r:
                raise child_error(r["error"])
            plain_row = Row("plain", speed_vs_plain=1.0)
            _fill_row(plain_row, r, res, None)
            res.rows.append(plain_row)
            done += 1
            tick(f"plain: done in {r['wall_s']:.1f} s, peak host {_mb(plain_row.peak_host_bytes)} MiB")
        budget_errors = []
        for policy in policies:
            tick(f"{policy}: started")
            row = Row(policy)
            r = run_child(dict(common, mode="managed", policy=policy), work, timeout)
            if "error" in r:
                e = child_error(r["error"])
                if not _is_budget_error(e):  # a policy that does not fit is a row, not a failure
                    raise e
                row.ok, row.error = False, str(e).splitlines()[0]
                budget_errors.append(e)
                what = "does not fit the budget"
            else:
                _fill_row(row, r, res, plain_row)
                what = (f"done in {r['wall_s']:.1f} s, peak host {_mb(row.peak_host_bytes)} MiB"
                        + ("" if row.exact is None else f", exact {'yes' if row.exact else 'no'}"))
            res.rows.append(row)
            done += 1
            tick(f"{policy}: {what}")
        if budget_errors and len(budget_errors) == len(policies):
            # nothing fits: the smallest budget any policy needs
            raise min(budget_errors, key=lambda e: getattr(e, "needed", float("inf")))
        if overhead:
            tick("fixed overhead: started")
            r = run_child(dict(common, mode="overhead"), work, timeout)
            if "error" not in r:
                res.fixed_overhead = r.get("warmup")
            done += 1
            tick(f"fixed overhead: {_mb((res.fixed_overhead or {}).get('rss'))} MiB")
    return res

# -- output ------------------------------------------------------------------------------------
def _mb(n) -> str:
    if n is None:
        return "-"
    m = n / 2**20
    return f"{m:,.0f}" if m >= 100 else f"{m:.1f}" if m >= 1 else f"{m:.3f}"


def _f(x, fmt="{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def _exact(r: Row) -> str:
    if r.run == "plain":
        return "ref"
    return "-" if r.exact is None else "yes" if r.exact else "no"


def format_table(res: ProfileResult) -> str:
    q_head = ""
    metric = next((r.quality.get("metric") for r in res.rows if r.quality), None)
    if metric:
        q_head = f" {'ppl' if metric == 'perplexity' else 'cosine':>8}"
    head = (f"{'run':<12} {'bits/w':>6} {'weights':>8} {'peak dev':>8} {'peak':>7} {'anon':>7} {'file':>7} "
            f"{'steady':>7} {'anon':>7} {'file':>7} {'fwd ms':>8} {'tok/s':>6} {'dec ms':>8} {'xfer ms':>7} "
            f"{'stall ms':>8} {'speed':>6} {'exact':>5}{q_head}")
    group = (f"{'':<12} {'':>6} {'MiB':>8} {'MiB':>8} {' host RSS of this run (MiB): peak | steady ':-^47}")
    title = (f"{res.model} on {res.device}: {res.params:,} parameters, {_mb(res.dense_bytes)} MiB dense; "
             + (f"forward = {res.tokens} tokens" if res.tokens else "forward = the example inputs"))
    if any(r.tokens_per_s for r in res.rows):
        title += f", tok/s = greedy generation of {res.gen_tokens} tokens"
        if res.prompt_tokens:
            title += f" after a {res.prompt_tokens}-token prompt"
    if res.mantissa_bits is not None:
        title += f"; mantissa bits {res.mantissa_bits}"
    if res.budget:
        title += f"; budget {res.budget}"
    lines = [title, group, head, "-" * len(head)]
    for r in res.rows:
        if not r.ok:
            lines.append(f"{r.run:<12} does not fit: {r.error}")
            continue
        q = ""
        if q_head:
            v = r.quality.get("value") if r.quality else None
            q = f" {_f(v, '{:.4f}' if metric == 'cosine' else '{:.3f}'):>8}"
        lines.append(f"{r.run:<12} {_f(r.bits_per_weight, '{:.2f}'):>6} {_mb(r.weights_bytes):>8} "
                     f"{_mb(r.peak_device_bytes):>8} {_mb(r.peak_host_bytes):>7} {_mb(r.peak_anon_bytes):>7} "
                     f"{_mb(r.peak_file_bytes):>7} {_mb(r.steady_host_bytes):>7} {_mb(r.steady_anon_bytes):>7} "
                     f"{_mb(r.steady_file_bytes):>7} {_f(r.forward_ms):>8} {_f(r.tokens_per_s):>6} "
                     f"{_f(r.decode_ms):>8} {_f(r.transfer_ms):>7} {_f(r.stall_ms):>8} "
                     f"{_f(r.speed_vs_plain, '{:.2f}x'):>6} {_exact(r):>5}{q}")
    fo = res.fixed_overhead
    if fo and fo.get("rss") is not None:
        parts = ", ".join(f"{k} {_mb(fo[k])}" for k in ("anon", "file") if fo.get(k) is not None)
        lines.append(f"runtime fixed overhead (numba + nzrt's compiled codec, once per process, in no row above): "
                     f"{_mb(fo['rss'])} MiB RSS" + (f" ({parts})" if parts else ""))
    lines.append("host memory: each run in its own process, minus a baseline taken there after the imports and the "
                 "codec warm-up; peak = max of 5 ms samples and VmHWM; steady = after the run, the model loaded; "
                 "anon = anonymous, file = file-backed pages (memory-mapped weights)")
    if res.device.startswith("cuda"):
        lines.append("peak dev: NVML used memory of the device above its baseline (after the CUDA context); "
                     "torch's allocator peak where NVML is unavailable")
    lines.append("exact: the first forward's output (logits) bit-identical to the plain run's, compared as integers; "
                 "fwd ms: best of the forwards after the first (which records the trace); decode/xfer/stall: "
                 "summed over layers for the whole run; speed: plain forward time / this one")
    dense_first = [run for run, d in res.details.items() if run != "plain" and d.get("lazy") is False]
    if dense_first:
        lines.append(f"note: {', '.join(dense_first)} loaded the model dense before compressing it (it is not read "
                     f"tensor by tensor: a factory or a GGUF, or model_arg.resolve(lazy=True) fell back to "
                     f"transformers' loader); their peaks "
                     f"include the dense weights")
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
    ax.set_ylabel("MiB above the run's baseline")
    ax.set_title(f"{res.model} on {res.device}: memory over time (each run in its own process)")
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
