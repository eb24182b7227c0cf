"""FSDP2 training on the CPU: plain PyTorch against nzrt.managed, 2 ranks over gloo, each mode its own job.

    cd /tmp && /work/main/.venv/bin/python /work/main/tools/bench_fsdp.py [--tiny | --tied-large-vocab]
        [--modes plain,plain-inbackward,nzrt] [--steps 6] [--batch 2] [--seq 128] [--rounds 1] [--json out.json]
    quick check: cd /tmp && /work/main/.venv/bin/python /work/main/tools/bench_fsdp.py --tiny

Run it from /tmp (the repository's kernels/ shadows a PyPI package); the ranks are started as
`python tools/bench_fsdp.py --worker ...` (subprocess.Popen, not torchrun) with cwd a temporary directory,
no repository root on PYTHONPATH, OMP_WAIT_POLICY=PASSIVE and MALLOC_MMAP_THRESHOLD_=65536 in every mode
(so the memory difference measured is nzrt's), torch.set_num_threads(1) in each rank.

The model: transformers' LlamaForCausalLM built by `_from_config(cfg, dtype=bfloat16)` with the same seed on
both ranks (identical weights in every mode), default ~0.32B (hidden 1024, 24 layers, intermediate 2048,
16 heads, vocab 32,000, untied head); --tied-large-vocab: a Gemma3-270M-like shape (vocab 262,144, hidden
640, 18 layers, 4 heads of 256, tied embeddings); --tiny: hidden 256, 2 layers, vocab 4096. Each decoder
layer and then the model go through `fully_shard(..., mesh=init_device_mesh("cpu", (2,)))`. Modes:

  plain             AdamW(model.parameters(), lr=1e-4, foreach=False); backward(); step(); zero_grad(set_to_none=True)
  plain-inbackward  one AdamW([p]) per (sharded) parameter, stepped and zeroed in its post-accumulate-grad hook
  nzrt              with nzrt.managed(model, optimizer=partial(AdamW, lr=1e-4, foreach=False)): backward() only

Per rank: RSS after imports + init_process_group (the baseline, before the model and nzrt's codec); VmHWM
reset (clear_refs) after fully_shard, before the mode's setup (optimizer / managed entry, both counted);
peak and steady RSS (anon and file apart) at the end of training; step time (median of steps 2..n);
each step's loss (float and hex bits); bytes all-gathered and reduce-scattered over the steps, counted at
the collective by a DefaultAllGather / DefaultReduceScatter subclass set with FSDPModule.set_custom_all_gather
/ set_custom_reduce_scatter (it wraps whatever comm is in place after the setup, so it counts what crosses
the wire whatever the runtime does to the tensors); sha256 of the final local shards (p.to_local(), name
order; nzrt: after the block's exit). The table shows the max over ranks (peak: worst round; step time:
best round); losses and weights are compared with plain's on both ranks and in every round.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODES = ("plain", "plain-inbackward", "nzrt")
SHAPES = {  # LlamaConfig keywords
    "default": dict(hidden_size=1024, intermediate_size=2048, num_hidden_layers=24, num_attention_heads=16,
                    num_key_value_heads=16, vocab_size=32000, tie_word_embeddings=False),
    "tied-large-vocab": dict(hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
                             num_key_value_heads=1, head_dim=256, vocab_size=262144, tie_word_embeddings=True),
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=4096, tie_word_embeddings=False),
}
MiB = 2 ** 20


# -- the worker: one rank of one mode -----------------------------------------------------------------
def counting_comms(counts: dict):
    """An all-gather and a reduce-scatter that add their input's bytes to ``counts`` and delegate to the
    comm that was in place (FSDP2's default, or one the runtime installed)."""
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather, DefaultReduceScatter

    class CountingAllGather(DefaultAllGather):
        def __init__(self, inner=None):
            self.inner = inner

        def allocate(self, *a, **k):
            return (self.inner or super()).allocate(*a, **k)

        def __call__(self, output_tensor, input_tensor, group, async_op=False):
            counts["all_gather"] += input_tensor.numel() * input_tensor.element_size()
            counts["all_gather_calls"] += 1
            return (self.inner or super()).__call__(output_tensor, input_tensor, group, async_op)

    class CountingReduceScatter(DefaultReduceScatter):
        def __init__(self, inner=None):
            self.inner = inner

        def allocate(self, *a, **k):
            return (self.inner or super()).allocate(*a, **k)

        def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
            counts["reduce_scatter"] += input_tensor.numel() * input_tensor.element_size()
            return (self.inner or super()).__call__(output_tensor, input_tensor, group, op, async_op)

    return CountingAllGather, CountingReduceScatter


def install_counters(model, counts: dict) -> int:
    """Wrap every FSDP module's all-gather and reduce-scatter (each module its own wrapper around its own
    current comm); the number of modules wrapped."""
    from torch.distributed.fsdp import FSDPModule

    ag, rs = counting_comms(counts)
    n = 0
    for m in model.modules():
        if isinstance(m, FSDPModule):
            groups = m._get_fsdp_state()._fsdp_param_groups
            if not groups:
                continue
            m.set_custom_all_gather(ag(groups[0]._all_gather_comm))
            m.set_custom_reduce_scatter(rs(groups[0]._reduce_scatter_comm))
            n += 1
    return n


def shard_digest(model) -> str:
    """sha256 over every parameter's local shard bytes, in name order."""
    import torch

    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        t = p.detach()
        t = t.to_local() if hasattr(t, "to_local") else t
        h.update(name.encode())
        h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def worker(a: dict) -> dict:
    import contextlib
    import functools
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    import transformers
    import transformers.models.llama.modeling_llama  # noqa: F401  (code, in the baseline)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import nzrt  # lazy: no codec yet
    from nzrt.osmem import reset_peak, rss

    torch.set_num_threads(1)
    transformers.utils.logging.set_verbosity_error()
    rank, mode = a["rank"], a["mode"]
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=600))
    mesh = init_device_mesh("cpu", (2,))
    base = rss()
    out = {"mode": mode, "rank": rank, "base": base,
           "codec_in_base": any(m in sys.modules for m in ("numba", "llvmlite"))}
    torch.manual_seed(a["seed"])  # the same weights on both ranks and in every mode
    cfg = transformers.LlamaConfig(max_position_embeddings=max(2048, a["seq"]), **SHAPES[a["shape"]])
    model = transformers.LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    model.train()
    out["params"] = sum(p.numel() for p in model.parameters())
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    x = torch.randint(0, cfg.vocab_size, (a["batch"], a["seq"]), generator=torch.Generator().manual_seed(1000 + rank))
    out["after_shard"] = rss()
    out["peak_reset"] = reset_peak()
    t = time.perf_counter()
    opt, run, ctx = None, None, contextlib.nullcontext()
    if mode == "plain":
        opt = torch.optim.AdamW(model.parameters(), lr=a["lr"], foreach=False)
    elif mode == "plain-inbackward":
        opts = {p: torch.optim.AdamW([p], lr=a["lr"], foreach=False) for p in model.parameters()}

        def hook(p):
            opts[p].step()
            opts[p].zero_grad(set_to_none=True)

        for p in opts:
            p.register_post_accumulate_grad_hook(hook)
    else:
        ctx = nzrt.managed(model, optimizer=functools.partial(torch.optim.AdamW, lr=a["lr"], foreach=False))
    with ctx as run:
        out["setup_s"] = time.perf_counter() - t
        out["after_setup"] = rss()
        counts = {"all_gather": 0, "all_gather_calls": 0, "reduce_scatter": 0}
        out["fsdp_modules_counted"] = install_counters(model, counts)
        losses, times = [], []
        for _ in range(a["steps"]):
            t = time.perf_counter()
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t)
            losses.append(loss.detach().float().item())
            del loss
        out["counts"] = dict(counts)
        out["end"] = rss()
        if run is not None:
            rep = run.report()
            out["report"] = str(rep)
    out["after_exit"] = rss()
    out["losses"] = losses
    out["losses_hex"] = [struct.pack(">f", v).hex() for v in losses]
    out["step_s"] = times
    out["step_med"] = statistics.median(times[1:] if len(times) > 1 else times)
    out["digest"] = shard_digest(model)
    dist.barrier()
    dist.destroy_process_group()
    return out


# -- the parent: a pair of ranks per mode -------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(port: int) -> dict:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", MALLOC_MMAP_THRESHOLD_="65536", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), WORLD_SIZE="2")
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    root = str(HERE.parent)
    parts = [p for p in env.pop("PYTHONPATH", "").split(os.pathsep) if p and os.path.abspath(p) != root]
    if parts:
        env["PYTHONPATH"] = os.pathsep.join(parts)
    return env


def run_pair(args: dict, timeout: float) -> dict:
    """Both ranks of one mode; {"ranks": [r0, r1]} or {"error": ...} (the other rank killed)."""
    with tempfile.TemporaryDirectory(prefix="bench_fsdp_") as tmp:
        env, procs, errs = child_env(free_port()), [], []
        for rank in range(2):
            err = open(Path(tmp) / f"rank{rank}.err", "w+")
            wa = dict(args, rank=rank, out=str(Path(tmp) / f"rank{rank}.json"))
            procs.append(subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(wa)],
                                          cwd=tmp, env=dict(env, RANK=str(rank)), stdout=err, stderr=err))
            errs.append(err)
        t0, failed = time.monotonic(), None
        while any(p.poll() is None for p in procs):
            bad = [i for i, p in enumerate(procs) if p.returncode not in (None, 0)]
            if bad or time.monotonic() - t0 > timeout:
                failed = f"rank {bad[0]} exited {procs[bad[0]].returncode}" if bad else f"timed out after {timeout:.0f} s"
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                        p.wait()
                break
            time.sleep(0.2)
        tails = []
        for e in errs:
            e.seek(0)
            tails.append(e.read())
            e.close()
        if failed is None and any(p.returncode for p in procs):
            failed = "exit codes " + ",".join(str(p.returncode) for p in procs)
        if failed:
            tail = "\n".join(f"--- rank {i} stderr ---\n" + t[-3000:] for i, t in enumerate(tails))
            last = next((ln for t in tails for ln in reversed(t.splitlines()) if "Error" in ln), "")
            return {"mode": args["mode"], "error": f"{failed}: {last.strip()[:300]}", "stderr": tail}
        ranks = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(2)]
        rep = (ranks[0].get("report") or "").splitlines()  # printed without its per-parameter warnings
        warn = [ln for ln in rep if ln.lstrip().startswith("warning:")]
        if rep:
            print("nzrt report (rank 0):\n" + "\n".join(ln for ln in rep if ln not in warn) +
                  (f"\n  ({len(warn)} warnings, e.g. {warn[0].strip()})" if warn else ""), file=sys.stderr, flush=True)
        return {"mode": args["mode"], "ranks": ranks, "wall_s": time.monotonic() - t0}


def summarize(res: dict, steps: int) -> dict:
    """One round of one mode: the max over ranks of each figure (MiB and seconds)."""
    rk = res["ranks"]
    peak = [r["end"]["peak"] for r in rk]
    return {"peak": max(peak), "growth": max(p - r["base"]["rss"] for p, r in zip(peak, rk)),
            "base": max(r["base"]["rss"] for r in rk), "steady": max(r["end"]["rss"] for r in rk),
            "anon": max(r["end"]["anon"] for r in rk), "file": max(r["end"]["file"] for r in rk),
            "after_setup": max(r["after_setup"]["rss"] - r["base"]["rss"] for r in rk),
            "ag": max(r["counts"]["all_gather"] for r in rk) / steps,
            "rs": max(r["counts"]["reduce_scatter"] for r in rk) / steps,
            "step": max(r["step_med"] for r in rk), "setup_s": max(r["setup_s"] for r in rk),
            "losses": [r["losses_hex"] for r in rk], "digest": [r["digest"] for r in rk],
            "loss_last": rk[0]["losses"][-1], "params": rk[0]["params"],
            "warn": sorted({w for r in rk for w in (["codec loaded before the baseline"] if r["codec_in_base"] else [])
                            + ([] if r["peak_reset"] else ["VmHWM not reset"])})}


def aggregate(rounds: list, modes: list) -> dict:
    """Per mode over rounds: worst peak/growth/steady, best step time, losses/weights from every round."""
    out = {}
    for m in modes:
        rows = [summarize(rnd[m], rnd["steps"]) for rnd in rounds if "ranks" in rnd.get(m, {})]
        if not rows:
            out[m] = {"error": next((rnd[m]["error"] for rnd in rounds if m in rnd), "not run")}
            continue
        best = dict(min(rows, key=lambda r: r["step"]))
        for k in ("peak", "growth", "steady", "anon", "file", "after_setup"):
            best[k] = max(r[k] for r in rows)
        best["all_losses"] = [r["losses"] for r in rows]
        best["all_digests"] = [r["digest"] for r in rows]
        failed = sum("error" in rnd.get(m, {}) for rnd in rounds)
        best["warn"] = best["warn"] + ([f"{failed} round(s) FAILED"] if failed else [])
        out[m] = best
    return out


def same(rows: list, ref: list | None) -> str:
    """yes if every round's per-rank values equal the reference's first round's (plain's)."""
    return "-" if ref is None else "yes" if all(x == ref[0] for x in rows + ref) else "NO"


def _r(x, y, fmt=".2f"):
    return "-" if not x or not y else format(x / y, fmt)


def print_table(agg: dict, a) -> None:
    p0 = next((r["params"] for r in agg.values() if "params" in r), 0)
    size = f"{p0 / 1e9:.3f}B params, {p0 * 2 / MiB:,.0f} MiB bf16" if p0 else "no mode ran"
    print(f"\n{a.shape} Llama ({size}), FSDP2 over 2 gloo ranks on the "
          f"CPU, batch {a.batch} x {a.seq} tokens per rank, {a.steps} steps, AdamW lr {a.lr}, {a.rounds} round(s); "
          "MiB, the max over the ranks (peak: worst round, step: best); growth and x: peak over the baseline "
          "after imports + init_process_group; AG/RS: MiB all-gathered / reduce-scattered per rank per step")
    hdr = (f"| {'mode':16s} | {'peak':>6s} | {'growth':>6s} | {'x plain':>7s} | {'x inbwd':>7s} | {'steady':>6s} | "
           f"{'anon':>6s} | {'file':>5s} | {'AG/step':>7s} | {'x plain':>7s} | {'RS/step':>7s} | {'step s':>6s} | "
           f"{'x plain':>7s} | {'losses = plain':>14s} | {'weights = plain':>15s} |")
    print(hdr + "\n|" + "|".join("-" * (len(c)) for c in hdr.split("|")[1:-1]) + "|")
    plain, inb = agg.get("plain"), agg.get("plain-inbackward")
    plain = None if plain is None or "error" in plain else plain
    inb = None if inb is None or "error" in inb else inb
    mib = lambda x: f"{x / MiB:,.0f}"  # noqa: E731
    for m, r in agg.items():
        if "error" in r:
            print(f"| {m:16s} | error: {r['error']} |")
            continue
        print(f"| {m:16s} | {mib(r['peak']):>6s} | {mib(r['growth']):>6s} | {_r(r['growth'], plain and plain['growth']):>7s} | "
              f"{_r(r['growth'], inb and inb['growth']):>7s} | {mib(r['steady']):>6s} | {mib(r['anon']):>6s} | "
              f"{mib(r['file']):>5s} | {r['ag'] / MiB:>7.1f} | {_r(r['ag'], plain and plain['ag']):>7s} | "
              f"{r['rs'] / MiB:>7.1f} | {r['step']:>6.2f} | {_r(r['step'], plain and plain['step']):>7s} | "
              f"{same(r['all_losses'], plain and plain['all_losses']):>14s} | "
              f"{same(r['all_digests'], plain and plain['all_digests']):>15s} |")
    for m, r in agg.items():
        if "error" not in r:
            print(f"  {m}: baseline {mib(r['base'])} MiB, after setup +{mib(r['after_setup'])}, setup {r['setup_s']:.2f} s, "
                  f"last loss {r['loss_last']:.6f} ({r['losses'][0][-1]})" + "".join(f"; {w}" for w in r["warn"]))
    print(flush=True)


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        return next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name"))
    except (OSError, subprocess.SubprocessError, StopIteration):
        return "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shape = ap.add_mutually_exclusive_group()
    shape.add_argument("--tiny", action="store_true", help="hidden 256, 2 layers, vocab 4096 (a quick check)")
    shape.add_argument("--tied-large-vocab", action="store_true", help="Gemma3-270M-like: vocab 262,144, tied")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=1, help="the modes run interleaved this many times")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per pair of ranks")
    ap.add_argument("--json", default=None, help="write every round's per-rank results and the summary here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        wa = json.loads(a.worker)
        Path(wa["out"]).write_text(json.dumps(worker(wa)))
        return 0
    a.modes = [m for m in a.modes.split(",") if m]
    if set(a.modes) - set(MODES) or a.steps < 1:
        ap.error(f"unknown modes {sorted(set(a.modes) - set(MODES))}" if a.steps >= 1 else "--steps must be >= 1")
    a.shape = "tiny" if a.tiny else "tied-large-vocab" if a.tied_large_vocab else "default"
    import torch

    head = {"machine": machine(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join([sys.executable] + sys.argv), "torch": torch.__version__, "cpus": os.cpu_count(),
            "load": os.getloadavg()[0]}
    print(f"machine: {head['machine']} ({head['cpus']} CPUs, load {head['load']:.2f}); date {head['date']}; "
          f"torch {head['torch']}\ncommand: {head['command']}", flush=True)
    common = {"shape": a.shape, "steps": a.steps, "batch": a.batch, "seq": a.seq, "lr": a.lr, "seed": a.seed}
    rounds, rc = [], 0
    for i in range(a.rounds):
        rnd = {"steps": a.steps}
        for m in a.modes:
            rnd[m] = run_pair(dict(common, mode=m), a.timeout)
            if "error" in rnd[m]:
                rc = 1
                print(f"  round {i + 1} {m}: ERROR {rnd[m]['error']}\n{rnd[m]['stderr']}", flush=True)
            else:
                s = summarize(rnd[m], a.steps)
                print(f"  round {i + 1} {m}: peak {s['peak'] / MiB:,.0f} MiB (+{s['growth'] / MiB:,.0f}), "
                      f"step {s['step']:.2f} s, AG {s['ag'] / MiB:.1f} MiB/step, losses r0 {s['losses'][0]}, "
                      f"wall {rnd[m]['wall_s']:.0f} s", flush=True)
        rounds.append(rnd)
    agg = aggregate(rounds, a.modes)
    print_table(agg, a)
    if a.json:
        Path(a.json).write_text(json.dumps({"head": head, "args": vars(a), "rounds": rounds, "summary": agg}, indent=1))
    return rc


if __name__ == "__main__":
    sys.exit(main())
