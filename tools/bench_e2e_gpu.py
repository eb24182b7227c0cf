"""End-to-end GPU benchmark: batch-1 greedy generation of a Llama-architecture model, tokens/s,
side by side in one run, at 1B and 8B shapes. Made to run in ONE call on an H100-class GPU:

    python tools/bench_e2e_gpu.py               # 1B and 8B shapes, table on stdout
    python tools/bench_e2e_gpu.py --record      # ... and append it to BENCHMARKS.md
    python tools/bench_e2e_gpu.py --smoke       # no GPU needed: every code path on the CPU with
                                                # tiny shapes (checks the script, numbers meaningless)
    bash tools/gpu_all.sh                       # on a bare GPU machine: this and
                                                # tools/bench_gpu.py --record, in one call

The model is transformers' ``LlamaForCausalLM`` built from a ``LlamaConfig`` (no hub): 1B shapes
(hidden 2048, intermediate 8192, 16 layers, 32 heads, 8 kv heads, vocab 128256) and 8B shapes
(hidden 4096, intermediate 14336, 32 layers, 32/8 heads, vocab 128256), untied head, built in bf16
directly on the device; matrices drawn N(0, 0.02) like a trained model's, norm weights 1.
Prompt: 32 random token ids, batch 1; greedy decoding of N new tokens (default 32) in a plain loop
with a ``DynamicCache`` (argmax of the last position's logits). tokens/s = N / wall time of the whole
loop (the prompt's forward included), between ``torch.cuda.synchronize()`` calls, after a warm-up.

Rows, per model size:
  (a) plain      the bf16 model on the GPU
  (b) resident   ``nzrt.managed(model, policy="resident")``: compressed on the GPU, decoded just in time
  (c) offload    ``nzrt.managed(model, policy=Offload(lookahead=K))``: compressed in pinned host
                 memory, copied and decoded K units ahead on a side stream
  (e) stream     the honest peer of (c), written here: the same weights DENSE in pinned host memory,
                 copied to the GPU on a side stream with events, K units ahead, via forward pre/post
                 hooks, with a pool of device buffers (no allocation in steady state). Units are the
                 modules nzrt makes units of (every module owning a parameter of >= 2048 elements:
                 each Linear, the norms, the head), so (c) and (e) follow the same schedule and differ
                 only in what crosses PCIe (compressed + decode vs dense). The execution order is
                 traced on the first forward and the prefetch follows it (cyclically, so the next
                 forward's first units arrive during the argmax). The embedding table stays in host
                 memory and only the looked-up rows are copied (nzrt likewise decodes only the 2 MiB
                 row chunk the token hits).
  (e') per block the same streamer with one unit per decoder layer (plus the final norm and the
                 head), K decoder layers ahead: more prefetch, more GPU memory (run last, an extra)
  (d) accelerate ``accelerate.cpu_offload(model, execution_device=cuda)`` on a CPU copy of the weights
                 (pageable, copied per module per forward, no prefetch). When its first forward says
                 it runs below ``--slow-tps`` (1 tok/s), only ``--slow-tokens`` (4) tokens are timed.
Columns: tokens timed, tokens/s, ratio vs (a), peak GPU memory (``torch.cuda.max_memory_allocated``,
reset after each row's setup, so it holds what generation needs: the weights where they are on the
GPU, buffers, activations, KV cache), host->device bytes per token (c: compressed bytes of the units
decoded from the host tier, from ``run.report()``; e: counted by the streamer; d: bytes accelerate
copies, counted by wrapping ``accelerate.hooks.set_module_tensor_to_device``), setup seconds (nzrt:
entry, i.e. compression; e: pinning; d: the CPU copy), and whether the tokens (and the first step's
logits, bit for bit) equal (a)'s. (b) and (c) are lossless: identical tokens are expected, and the
"lossless check" lines say so.

Every row is guarded: an error is printed in the table and the next row runs. Rows that would start
after ``--deadline`` seconds are skipped; a row's timed tokens are cut so it takes at most
``--section-cap`` seconds (the row says so). SIGTERM (e.g. ``timeout``) stops the run and what was
measured is still printed (and recorded, marked partial).
Exit status: 0 every row ran and (b)/(c) are lossless, 1 an error or a mismatch, 2 no CUDA device.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field

from nzrt.budget import format_bytes

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_MD = os.path.join(ROOT, "BENCHMARKS.md")
NO_CUDA = "no CUDA device: run this on a GPU machine (or --smoke to check the script on the CPU)"

COMMON = dict(num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)
SIZES = {
    "1B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, **COMMON),
    "8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, **COMMON),
}
# --smoke: two tiny shapes (the second one also takes the "slow, few tokens" path of (d))
SMOKE_SIZES = {
    "tiny-a": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=512),
    "tiny-b": dict(hidden_size=96, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=640),
}
METHODS = {  # key -> label, in the order they run (the extra per-block streaming row last)
    "plain": "(a) plain bf16",
    "resident": "(b) nzrt resident",
    "offload": "(c) nzrt offload",
    "stream": "(e) dense pinned stream",
    "accelerate": "(d) accelerate cpu_offload",
    "stream-block": "(e') dense pinned stream, per block",
}
MIN_NUMEL = 2048  # nzrt.managed's default: smaller parameters stay dense (and resident) in both


class Interrupted(Exception):
    """SIGTERM: stop measuring, print what we have."""


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------

def sync(dev):
    import torch
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def free_memory(dev):
    import torch
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        empty_host = getattr(torch._C, "_host_emptyCache", None)  # cached pinned host blocks
        if empty_host is not None:
            try:
                empty_host()
            except Exception:  # noqa: BLE001 - best effort
                pass


def reset_peak(dev):
    import torch
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)


def peak(dev):
    import torch
    return torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None


def env_info(smoke: bool) -> dict:
    import torch
    try:
        import triton
        tv = triton.__version__
    except Exception:  # noqa: BLE001
        tv = "not installed"
    versions = {}
    for mod in ("transformers", "accelerate"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            versions[mod] = "not installed"
    from nzrt.cli.env import driver_version
    driver = "-" if smoke else driver_version()
    dev = "CPU (--smoke: numbers are meaningless)" if smoke else torch.cuda.get_device_name()
    return dict(device=dev, driver=driver, torch=torch.__version__, cuda=torch.version.cuda, triton=tv,
                python=platform.python_version(), **versions,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


# ---------------------------------------------------------------------------------------------
# the model and the generation loop
# ---------------------------------------------------------------------------------------------

def build_model(shape: dict, dev, seed: int):
    """LlamaForCausalLM in bf16, built directly on ``dev`` (no slow CPU init), weights drawn in place:
    matrices N(0, 0.02), 1-D weights (the RMSNorms) 1. Same seed, same device -> same weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(tie_word_embeddings=False, **shape)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(dev):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
            else:
                p.fill_(1.0)
    model.eval().requires_grad_(False)
    sync(dev)
    return model


def greedy(model, prompt, n: int, dev):
    """n new tokens, greedy, KV cache. Returns (token ids, first step's logits, seconds)."""
    import torch
    from transformers import DynamicCache
    cache = DynamicCache()
    ids = prompt
    out, first = [], None
    sync(dev)
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(n):
            logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1, :]
            if i == 0:
                first = logits.clone()
            ids = logits.argmax(dim=-1, keepdim=True)
            out.append(ids)
    sync(dev)
    dt = time.perf_counter() - t0
    return torch.cat(out, dim=1)[0].tolist(), first, dt


class ModelSource:
    """The model of one size, built once and shared by rows that give it back intact ((a), (b), (c));
    rows that consume it ((d), (e)) take it and the next one is built again, identically."""

    def __init__(self, shape, dev, seed):
        self.shape, self.dev, self.seed = shape, dev, seed
        self.model = None
        self.built_s = 0.0

    def get(self):
        if self.model is None:
            free_memory(self.dev)
            t0 = time.perf_counter()
            self.model = build_model(self.shape, self.dev, self.seed)
            self.built_s = time.perf_counter() - t0
            print(f"  built the model in {self.built_s:.1f} s", flush=True)
        return self.model

    def take(self):
        m = self.get()
        self.model = None
        return m

    def drop(self):
        self.model = None
        free_memory(self.dev)


# ---------------------------------------------------------------------------------------------
# (e) dense pinned streaming with the same prefetch
# ---------------------------------------------------------------------------------------------

class _Unit:
    __slots__ = ("name", "module", "params", "nbytes")

    def __init__(self, name, module, params):
        self.name, self.module, self.params = name, module, params  # params: [(param, host tensor)]
        self.nbytes = sum(h.numel() * h.element_size() for _, h in params)


class DenseStream:
    """Weights dense in pinned host memory; each unit copied to a pooled device buffer on a side
    stream (events, no host synchronisation) ``lookahead`` units ahead of its use, following the
    execution order traced on the first forward. ``by``: "module" (nzrt's units: every module owning
    a parameter of >= ``min_numel`` elements) or "block" (one unit per decoder layer, plus the other
    modules owning such parameters). The embedding's table stays in host memory; only the rows
    looked up are copied. On the CPU (``--smoke``) the same logic runs with synchronous copies."""

    def __init__(self, model, dev, lookahead: int = 2, by: str = "module", min_numel: int = MIN_NUMEL):
        import torch
        self.torch = torch
        self.model, self.dev, self.k = model, dev, max(0, int(lookahead))
        self.cuda = dev.type == "cuda"
        self.side = torch.cuda.Stream(dev) if self.cuda else None
        self.units: dict = {}
        self.free: dict = {}      # (dtype, numel) -> [(buffer, event after its last reader)]
        self.ready: dict = {}     # unit -> (buffers, event after their copy)
        self.trace: list = []
        self.mode, self.pos, self.depth = "record", 0, 0
        self.bytes_moved = 0
        self.allocations = 0
        self.divergences = 0
        self.handles: list = []
        self.bound: set = set()   # units whose forward is running (their buffers are in use)
        self.embed = model.get_input_embeddings()
        self.embed_host = self._to_host(self.embed.weight)
        hosted = {id(self.embed.weight): self.embed_host}  # a tied head streams the same host copy

        chosen = []
        if by == "block":
            layers = _decoder_layers(model)
            inside = {id(m) for layer in layers for m in layer.modules()}
            names = {id(m): n for n, m in model.named_modules()}
            for layer in layers:
                chosen.append((names[id(layer)], layer, [p for _, p in layer.named_parameters()]))
            for n, m in model.named_modules():
                if id(m) in inside or m is self.embed:
                    continue
                ps = [p for p in m.parameters(recurse=False) if p.numel() >= min_numel]
                if ps:
                    chosen.append((n, m, ps))
        elif by == "module":
            for n, m in model.named_modules():
                if m is self.embed:
                    continue
                ps = [p for p in m.parameters(recurse=False) if p.numel() >= min_numel]
                if ps:
                    chosen.append((n, m, ps))
        else:
            raise ValueError(f"--stream-by must be 'module' or 'block', not {by!r}")
        for name, module, ps in chosen:
            entries = []
            for p in ps:
                host = hosted.get(id(p))
                if host is None:
                    host = hosted[id(p)] = self._to_host(p)
                entries.append((p, host))
            if entries:
                unit = _Unit(name or "<root>", module, entries)
                self.units[unit.name] = unit
                self.handles.append(module.register_forward_pre_hook(self._make_pre(unit)))
                self.handles.append(module.register_forward_hook(self._make_post(unit), always_call=True))
        self.embed.forward = self._embed_forward
        self.handles.append(model.register_forward_pre_hook(self._root_pre, prepend=True))
        self.handles.append(model.register_forward_hook(self._root_post, always_call=True))
        sync(dev)

    def _to_host(self, p):
        """Replace the parameter's storage by a (pinned) host copy; the device copy is freed."""
        torch = self.torch
        host = torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=self.cuda)
        host.copy_(p.data)
        p.data = host
        return host

    @property
    def host_bytes(self) -> int:
        return sum(u.nbytes for u in self.units.values()) + self.embed_host.numel() * self.embed_host.element_size()

    # -- hooks --------------------------------------------------------------------------------
    def _root_pre(self, module, args):
        self.depth += 1
        if self.depth == 1 and self.mode == "follow" and self.pos != 0:
            self._diverge()

    def _root_post(self, module, args, output):
        self.depth -= 1
        if self.depth:
            return
        if self.mode == "record":
            self.mode, self.pos = ("follow" if self.trace else "record"), 0
        elif self.mode == "ondemand" or self.pos != 0:  # departed from the trace: trace again
            self._drop_prefetched()
            self.trace, self.mode, self.pos = [], "record", 0

    def _make_pre(self, unit):
        def pre(module, args):
            name = unit.name
            if self.depth:
                if self.mode == "record":
                    self.trace.append(name)
                elif self.mode == "follow":
                    if self.trace[self.pos] != name:
                        self._diverge()
                    else:
                        self.pos = (self.pos + 1) % len(self.trace)
            self._issue(name)  # its own copy first (a no-op when prefetched)
            if self.mode == "follow" and self.depth:
                n = len(self.trace)
                for j in range(min(self.k, n)):
                    self._issue(self.trace[(self.pos + j) % n])
            bufs, done = self.ready[name]
            if done is not None:
                self.torch.cuda.current_stream(self.dev).wait_event(done)
            for (p, _), buf in zip(unit.params, bufs):
                p.data = buf.view(p.shape)
            self.bound.add(name)
        return pre

    def _make_post(self, unit):
        def post(module, args, output):
            self.bound.discard(unit.name)
            entry = self.ready.pop(unit.name, None)
            for p, host in unit.params:
                p.data = host
            if entry is not None:
                self._release(entry[0])
        return post

    def _embed_forward(self, input):
        idx = input.reshape(-1).to("cpu")          # a host sync, as nzrt's chunked embedding has
        rows = self.embed_host.index_select(0, idx)
        self.bytes_moved += rows.numel() * rows.element_size()
        if self.cuda:
            rows = rows.pin_memory().to(self.dev, non_blocking=True)
        return rows.view(*input.shape, rows.shape[-1])

    # -- mechanism ----------------------------------------------------------------------------
    def _event_now(self):
        if not self.cuda:
            return None
        ev = self.torch.cuda.Event()
        ev.record(self.torch.cuda.current_stream(self.dev))
        return ev

    def _issue(self, name):
        if name in self.ready:
            return
        torch = self.torch
        unit = self.units[name]
        bufs, waits = [], []
        for _, host in unit.params:
            free = self.free.get((host.dtype, host.numel()))
            if free:
                buf, ev = free.pop()
            else:
                buf = torch.empty(host.numel(), dtype=host.dtype, device=self.dev)
                self.allocations += 1
                # fresh memory may have been freed by the compute stream with kernels still
                # queued on it: the copy waits for what the compute stream has issued so far
                ev = self._event_now()
            bufs.append(buf)
            waits.append(ev)
        if self.cuda:
            with torch.cuda.stream(self.side):
                for ev in waits:
                    if ev is not None:
                        self.side.wait_event(ev)
                for (_, host), buf in zip(unit.params, bufs):
                    buf.copy_(host.view(-1), non_blocking=True)
                done = torch.cuda.Event()
                done.record(self.side)
        else:
            for (_, host), buf in zip(unit.params, bufs):
                buf.copy_(host.view(-1))
            done = None
        self.ready[name] = (bufs, done)
        self.bytes_moved += unit.nbytes

    def _release(self, bufs):
        ev = self._event_now()  # the compute stream's last use of these buffers
        for buf in bufs:
            self.free.setdefault((buf.dtype, buf.numel()), []).append((buf, ev))

    def _drop_prefetched(self):
        for name in [n for n in self.ready if n not in self.bound]:
            bufs, _ = self.ready.pop(name)
            self._release(bufs)  # the side stream writes in order: a later copy waits for this one

    def _diverge(self):
        self.divergences += 1
        self.mode, self.pos = "ondemand", 0
        self._drop_prefetched()

    def close(self):
        """Remove the hooks; the weights stay in host memory (the model is on the CPU now)."""
        sync(self.dev)
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.embed.__dict__.pop("forward", None)
        for name, (bufs, _) in list(self.ready.items()):
            unit = self.units[name]
            for p, host in unit.params:
                p.data = host
        self.ready.clear()
        self.free.clear()


def _decoder_layers(model):
    import torch
    for n, m in model.named_modules():
        if n.endswith("layers") and isinstance(m, torch.nn.ModuleList):
            return list(m)
    raise ValueError("no decoder-layer ModuleList found (expected model.model.layers)")


# ---------------------------------------------------------------------------------------------
# rows
# ---------------------------------------------------------------------------------------------

@dataclass
class Row:
    size: str
    method: str
    tokens: int | None = None
    tps: float | None = None
    peak: int | None = None
    h2d_per_token: float | None = None
    setup_s: float | None = None
    ratio: float | None = None
    same: str = ""
    lossless: bool | None = None
    error: str | None = None
    notes: list = field(default_factory=list)
    skipped: str | None = None


def guarded(row: Row, fn) -> Row:
    """Run one row; an exception is printed (traceback on stderr) and kept in the row."""
    try:
        fn(row)
    except Interrupted:
        row.error = "interrupted (SIGTERM)"
        raise
    except Exception as e:  # noqa: BLE001 - one failing row must not stop the others
        traceback.print_exc()
        msg = f"{type(e).__name__}: {e}".replace("\n", " ").replace("|", "/")
        row.error = msg[:160] + ("..." if len(msg) > 160 else "")
        print(f"  {row.method}: ERROR {row.error}", flush=True)
    return row


def compare(ref, toks, logits) -> tuple[str, bool | None]:
    import torch
    if ref is None:
        return "n/a (no plain run)", None
    rtoks, rlogits = ref
    m = min(len(toks), len(rtoks))  # a row cut to fewer tokens is compared on what both have
    if toks[:m] != rtoks[:m]:
        i = next(j for j, (a, b) in enumerate(zip(toks, rtoks)) if a != b)
        return f"DIFFERENT tokens (first at {i} of {m})", False
    if logits is not None and rlogits is not None and logits.shape == rlogits.shape and torch.equal(logits, rlogits):
        return f"tokens identical ({m}/{m}), logits bit-identical", True
    d = (logits.float() - rlogits.float()).abs().max().item() if logits is not None else float("nan")
    return f"tokens identical ({m}/{m}), logits differ (max |d| {d:.3g})", True


class Bench:
    def __init__(self, args, dev, smoke):
        self.args, self.dev, self.smoke = args, dev, smoke
        self.t_start = time.perf_counter()
        self.rows: list = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def measure(self, row, model, prompt, *, plan_warmup=False, slow_ok=False, h2d=None, force_slow=False):
        """Probe (1 token), warm up, time ``n`` tokens. ``h2d()``: bytes moved so far."""
        a, dev = self.args, self.dev
        reset_peak(dev)
        _, _, t_probe = greedy(model, prompt, 1, dev)
        est_tps = 1.0 / max(t_probe, 1e-9)
        n = a.new_tokens
        slow = slow_ok and (force_slow or est_tps < a.slow_tps)
        if slow:
            n = min(n, a.slow_tokens)
            why = "forced by --smoke" if force_slow else f"< {a.slow_tps:g} tok/s"
            row.notes.append(f"first forward {t_probe:.2f} s ({why}): {n} tokens timed")
            warm = 2 if plan_warmup else 0
        else:
            warm = a.warmup
        if warm:
            _, _, t_warm = greedy(model, prompt, warm, dev)
            est_tps = warm / max(t_warm, 1e-9)  # steady state (the probe may include one-time costs)
        cap = min(a.section_cap, max(5.0, a.deadline - self.elapsed()))
        fit = int(cap * est_tps)
        if fit < n:
            n = max(2, fit)
            row.notes.append(f"cut to {n} tokens to stay within {cap:.0f} s")
        h0 = h2d() if h2d else None
        toks, logits, dt = greedy(model, prompt, n, dev)
        h1 = h2d() if h2d else None
        row.tokens, row.tps, row.peak = n, n / dt, peak(dev)
        if h2d:
            row.h2d_per_token = (h1 - h0) / n
        return toks, logits

    def run_size(self, size, shape, force_slow=False):
        import torch

        import nzrt
        from nzrt.policies import Offload
        a, dev = self.args, self.dev
        print(f"\n== {size}: {shape}", flush=True)
        src = ModelSource(shape, dev, seed=a.seed)
        g = torch.Generator().manual_seed(a.seed + 1)
        prompt = torch.randint(0, shape["vocab_size"], (1, a.prompt_len), generator=g).to(dev)
        ref = None
        rows = {}

        def plain(row):
            nonlocal ref
            had = src.model is not None
            m = src.get()
            row.setup_s = 0.0 if had else src.built_s
            nbytes = sum(p.numel() * p.element_size() for p in m.parameters())
            row.notes.append(f"weights {format_bytes(nbytes)} ({sum(p.numel() for p in m.parameters()) / 1e9:.2f}B params)")
            toks, logits = self.measure(row, m, prompt)
            ref = (toks, logits)
            row.same, row.lossless = "(reference)", True

        def nzrt_row(policy, label):
            def fn(row):
                m = src.get()
                run = nzrt.managed(m, policy=policy)
                t0 = time.perf_counter()
                try:
                    run.attach()  # on failure it restores the model itself; build anew to be sure
                except BaseException:
                    src.drop()
                    raise
                ok = False
                try:
                    row.setup_s = time.perf_counter() - t0

                    def h2d():
                        rep = run.report()
                        return sum(x.decodes * x.compressed_bytes for x in rep.layers if x.tier in ("host", "disk"))
                    toks, logits = self.measure(row, m, prompt, plan_warmup=True,
                                                h2d=h2d if label == "offload" else None)
                    rep = run.report()
                    held = rep.held
                    t = rep.totals()
                    row.notes.append(f"{100 * rep.ratio:.1f}% of dense; plan {rep.plan.split(':')[0] or '-'}; "
                                     f"passes {rep.passes}, trace changes {rep.divergences}, slot allocs "
                                     f"{rep.pool_allocations}; stalls {t['stall_s'] * 1e3:.0f} ms; held "
                                     + ", ".join(f"{k} {format_bytes(v)}" for k, v in held.items() if v))
                    print("\n".join("    " + s for s in str(rep).splitlines()[:8]), flush=True)
                    row.same, row.lossless = compare(ref, toks, logits)
                    ok = True
                finally:
                    t1 = time.perf_counter()
                    try:
                        run.detach()
                        row.notes.append(f"exit (restore) {time.perf_counter() - t1:.1f} s")
                    except BaseException:
                        src.drop()  # the model may be half restored: build it again for the next row
                        raise
                    if not ok:
                        src.drop()
            return fn

        def stream_row(by):
            def fn(row):
                m = src.take()  # the weights move to host memory: this model is used up
                t0 = time.perf_counter()
                st = DenseStream(m, dev, lookahead=a.lookahead, by=by)
                row.setup_s = time.perf_counter() - t0
                free_memory(dev)
                try:
                    toks, logits = self.measure(row, m, prompt, h2d=lambda: st.bytes_moved)
                    row.same, row.lossless = compare(ref, toks, logits)
                    row.notes.append(f"{len(st.units)} units by {by}, lookahead {st.k}; host {format_bytes(st.host_bytes)}; "
                                     f"device buffers allocated {st.allocations}; trace changes {st.divergences}")
                finally:
                    st.close()
                    del m, st
                    free_memory(dev)
            return fn

        def accelerate_row(row):
            import accelerate.hooks as ah
            from accelerate import cpu_offload
            m = src.take()
            t0 = time.perf_counter()
            cpu_offload(m, execution_device=dev)
            sync(dev)
            row.setup_s = time.perf_counter() - t0
            free_memory(dev)
            moved = [0]
            counting = [False]
            orig = getattr(ah, "set_module_tensor_to_device", None)

            def counted(module, tensor_name, device, value=None, *args, **kw):
                if counting[0] and value is not None and str(device) != "meta":
                    moved[0] += value.numel() * value.element_size()
                return orig(module, tensor_name, device, value, *args, **kw)
            if orig is not None:
                ah.set_module_tensor_to_device = counted
            else:
                row.notes.append("accelerate.hooks.set_module_tensor_to_device not found: bytes not counted")
            counting[0] = True
            try:
                toks, logits = self.measure(row, m, prompt, slow_ok=True, force_slow=force_slow,
                                            h2d=(lambda: moved[0]) if orig is not None else None)
                row.same, row.lossless = compare(ref, toks, logits)
            finally:
                counting[0] = False
                if orig is not None:
                    ah.set_module_tensor_to_device = orig
                del m
                free_memory(dev)

        fns = {"plain": plain, "resident": nzrt_row("resident", "resident"),
               "offload": nzrt_row(Offload(lookahead=a.lookahead), "offload"),
               "stream": stream_row("module"), "stream-block": stream_row("block"),
               "accelerate": accelerate_row}
        try:
            for key in METHODS:
                if key not in a.methods:
                    continue
                row = Row(size=size, method=METHODS[key])
                self.rows.append(row)
                rows[key] = row
                if self.elapsed() > a.deadline:
                    row.skipped = f"skipped: past --deadline {a.deadline:.0f} s"
                    print(f"  {row.method}: {row.skipped}", flush=True)
                    continue
                print(f"  {row.method} ... ({self.elapsed():.0f} s in)", flush=True)
                guarded(row, fns[key])
                if row.error is None:
                    print(f"  {row.method}: {row.tps:.2f} tok/s, {row.tokens} tokens, peak {format_bytes(row.peak)}, "
                          f"h2d/token {format_bytes(row.h2d_per_token)}, setup {row.setup_s:.1f} s; {row.same}; "
                          + "; ".join(row.notes), flush=True)
        finally:
            src.drop()
            base = rows.get("plain")
            for r in rows.values():
                r.ratio = (r.tps / base.tps) if (base and base.tps and r.tps) else None

    # -- output ---------------------------------------------------------------------------------
    def table(self) -> list:
        out = ["| model | method | tokens | tokens/s | vs plain | peak GPU memory | host->device / token "
               "| setup s | same output as plain |",
               "|---|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            if r.skipped or r.error:
                why = r.skipped or f"ERROR {r.error}"
                out.append(f"| {r.size} | {r.method} | - | {why} | - | - | - | - | - |")
                continue
            ratio = r.ratio
            h2d = "-" if r.h2d_per_token is None else format_bytes(r.h2d_per_token)
            pk = "n/a (CPU)" if r.peak is None else format_bytes(r.peak)
            out.append(f"| {r.size} | {r.method} | {r.tokens} | {r.tps:.2f} | "
                       f"{'-' if ratio is None else f'{ratio:.2f}x'} | {pk} | {h2d} | "
                       f"{'-' if r.setup_s is None else f'{r.setup_s:.1f}'} | {r.same} |")
        return out

    def lossless_lines(self) -> list:
        out = []
        for r in self.rows:
            if not (r.method.startswith("(b)") or r.method.startswith("(c)")):
                continue
            if r.error or r.skipped:
                out.append(f"lossless check [{r.size}] {r.method}: not run ({r.error or r.skipped})")
            elif r.lossless is None:
                out.append(f"lossless check [{r.size}] {r.method}: not checked ({r.same})")
            elif r.lossless:
                out.append(f"lossless check [{r.size}] {r.method}: identical to plain: {r.same}")
            else:
                out.append(f"lossless check [{r.size}] {r.method}: NOT identical to plain: {r.same}")
        return out

    def notes(self) -> list:
        return [f"- {r.size} {r.method}: " + "; ".join(r.notes) for r in self.rows if r.notes]


def record(lines, env, argv, partial):
    cmd = "python tools/bench_e2e_gpu.py " + " ".join(argv)
    head = (f"\n## End to end: Llama 1B/8B shapes, batch-1 greedy tokens/s on {env['device']} ({env['date']})"
            f"{' (PARTIAL: interrupted)' if partial else ''}\n\n"
            f"driver {env['driver']} · CUDA {env['cuda']} · torch {env['torch']} · triton {env['triton']} "
            f"· transformers {env['transformers']} · accelerate {env['accelerate']} · python {env['python']}  \n"
            f"command: `{cmd.strip()}`\n\n")
    with open(BENCH_MD, "a") as f:
        f.write(head + "\n".join(lines) + "\n")
    print(f"appended to {BENCH_MD}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--record", action="store_true", help="append the results to BENCHMARKS.md")
    p.add_argument("--smoke", action="store_true",
                   help="every code path on the CPU with tiny shapes (checks the script, not the GPU)")
    p.add_argument("--sizes", nargs="+", default=None, help=f"model sizes (default: {' '.join(SIZES)})")
    p.add_argument("--methods", nargs="+", default=None,
                   help=f"rows to run, of {' '.join(METHODS)} (default: all)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens generated and timed (default 32)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 32)")
    p.add_argument("--warmup", type=int, default=3, help="tokens of the warm-up generation")
    p.add_argument("--lookahead", type=int, default=2, help="prefetch depth of (c) and (e), in units")
    p.add_argument("--slow-tps", type=float, default=1.0,
                   help="(d) below this many tokens/s (first forward) times only --slow-tokens")
    p.add_argument("--slow-tokens", type=int, default=4)
    p.add_argument("--section-cap", type=float, default=60.0, help="seconds of timed generation per row, at most")
    p.add_argument("--deadline", type=float, default=480.0, help="rows starting later than this are skipped (s)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    smoke = a.smoke
    if smoke and a.record:
        print("bench_e2e_gpu: --smoke numbers are not benchmarks; refusing to --record them", file=sys.stderr)
        return 2

    import torch
    if not smoke and not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    sizes = SMOKE_SIZES if smoke else SIZES
    names = a.sizes or list(sizes)
    for n in names:
        if n not in sizes:
            p.error(f"unknown size {n!r}; choose from {', '.join(sizes)}")
    a.methods = a.methods or list(METHODS)
    for m in a.methods:
        if m not in METHODS:
            p.error(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    a.new_tokens = a.new_tokens or (4 if smoke else 32)
    a.prompt_len = a.prompt_len or (8 if smoke else 32)
    if smoke:
        a.warmup = min(a.warmup, 2)
    dev = torch.device("cpu") if smoke else torch.device("cuda", torch.cuda.current_device())

    def on_term(signum, frame):
        raise Interrupted()
    signal.signal(signal.SIGTERM, on_term)

    env = env_info(smoke)
    print(f"device: {env['device']} · driver {env['driver']} · CUDA {env['cuda']} · torch {env['torch']} · "
          f"triton {env['triton']} · transformers {env['transformers']} · accelerate {env['accelerate']} · "
          f"{env['date']}", flush=True)
    print(f"batch 1, prompt {a.prompt_len} tokens, {a.new_tokens} new tokens greedy, warm-up {a.warmup}, "
          f"lookahead {a.lookahead}, rows: {', '.join(a.methods)}", flush=True)
    bench = Bench(a, dev, smoke)
    partial = False
    try:
        for i, n in enumerate(names):
            bench.run_size(n, sizes[n], force_slow=smoke and i == len(names) - 1)
    except Interrupted:
        partial = True
        print("\ninterrupted (SIGTERM): printing what was measured", flush=True)
    lines = [f"batch 1 · prompt {a.prompt_len} tokens · {a.new_tokens} new tokens, greedy, KV cache · "
             f"warm-up {a.warmup} · prefetch lookahead {a.lookahead} units (c, e) · bf16 weights N(0, 0.02)", ""]
    lines += bench.table() + [""] + bench.lossless_lines() + ["", "Notes:"] + bench.notes()
    lines.append(f"\nwall time {bench.elapsed():.0f} s")
    print("\n" + "\n".join(lines), flush=True)
    if a.record:
        record(lines, env, argv, partial)
    bad = partial or any(r.error for r in bench.rows) or any(
        r.lossless is False for r in bench.rows if r.method[:3] in ("(b)", "(c)"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
