"""Fused decode-matmul on the CPU: the kernel next to plain torch bf16 ``F.linear``, and greedy
generation end to end (plain, nzrt, nzrt with ``--fused``).

    .venv/bin/python tools/bench_fused.py [--shapes smol,llama8b] [--batches 1,4,16] [--reps 7] [--cold]
        [--bits minilm,smollm2] [--e2e smollm2,llama1.1b] [--rounds 3] [--new 32] [--prompts 5]

Per layer shape (SmolLM2-135M: q/o 576->576, k/v 576->192, gate/up 576->1536, down 1536->576,
head 576->49152; Llama-3-8B: 4096->4096, 4096->14336, 14336->4096) and batch (x rows): the
median time of
  fused     ``cpu_fused.FusedWeight(ct).linear(x)`` (prepared once per weight, as the runtime
            keeps it): y = x @ W.T straight from the compressed W;
  plain     torch ``F.linear(x, W)`` on the dense bf16 W (the same x);
  dec+lin   ``nzrt.decompress(ct, out=dense)`` then ``F.linear`` (what the runtime does today);
  copy      torch ``copy_`` of a uint8 buffer of the compressed bytes (the roofline for any
            kernel that reads them once);
and the effective bandwidths: compressed bytes / time for fused and copy, dense bytes / time for
plain. ``plain/fused`` > 1 would mean the fused kernel is faster than plain. W is bf16 drawn from
N(0, 0.02) (its exponents code like a trained layer's, ~10.7 bits/weight); x is bf16 N(0, 1).
Threads: torch's and numba's defaults (all cores). OMP_WAIT_POLICY=PASSIVE unless set. The load
average is printed before and after: on a shared machine the times are only as good as it.
Large shapes get fewer repetitions (``--reps`` scaled down by size, at least 3).

``window``: the same weight compressed with the window code (``widths=WINDOW4``, one 4-bit
exponent level, ~12 bits/weight), which ``nzrt.kernels.cpu.fused_w4`` multiplies from. ``--bits``: bits/weight of
the embedded MiniLM and SmolLM2 under the smallest code and the window code.

End to end (``--e2e``): tokens/s of greedy generation (``model.generate``, no sampling, a fixed
number of new tokens) over the first ``--prompts`` prompts of ``nzrt/data/prompts.txt``, after a
warm-up generation, for plain bf16 PyTorch, ``nzrt.managed(policy="auto")`` (decode then matmul,
bit-identical to plain), ``policy="fused"`` (window code) and ``Fused(widths=None)`` (the smallest
code: the same sums, so the same tokens); each (model, mode) runs in a process of its own,
the four modes interleaved over ``--rounds`` rounds, the median shown. Models: the embedded
SmolLM2-135M; a TinyLlama-1.1B-shaped Llama (hidden 2048, 22 layers, std-0.02 weights). The last
RSS: the process's resident memory right after the timed generations (plain: the dense
model; nzrt and fused: compressed weights and the runtime; the loading before entry included as
far as the allocator kept it). The last column says whether greedy text under fused matches
plain's, prompt by prompt (the fused kernels
sum in another order than torch's GEMM: a near-tie between the two best tokens can flip).

``--cold``: every timed call uses the next of several copies of the weight (dense and compressed),
together >= 96 MiB, so a layer's bytes come from DRAM as in generation (a model streams all its
weights once per token); without it, small layers are re-read from the caches, which flatters
every column and plain most (its dense bytes are 1.5x the compressed).
"""
from __future__ import annotations

import argparse
import math
import datetime as _dt
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: its OpenMP threads must not spin

import numba  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import nzrt  # noqa: E402
from nzrt import codec  # noqa: E402
from nzrt.kernels.cpu import fused as cpu_fused  # noqa: E402

SHAPES = {  # name: [(label, in_features K, out_features N)]
    "smol": [("smol q/o", 576, 576), ("smol k/v", 576, 192), ("smol gate/up", 576, 1536),
             ("smol down", 1536, 576), ("smol head", 576, 49152)],
    "llama8b": [("8b q/o", 4096, 4096), ("8b gate/up", 4096, 14336), ("8b down", 14336, 4096)],
    "tiny": [("tiny", 96, 40)],  # for the smoke test
}


def median_time(fn, reps: int) -> float:
    fn()  # warm: compile, page in
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


# -- end to end: tokens/s of greedy generation ----------------------------------------------------
PROMPTS = (Path(nzrt.__file__).parent / "data" / "prompts.txt").read_text().strip().splitlines()
MODES = ("plain", "nzrt", "fused", "fused-cascade")  # plain bf16 PyTorch; nzrt.managed (auto); Fused(auto)
# with the window code (the default); Fused(auto, widths=None): the smallest code
LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)


def _load(model: str):
    """(model, tokenizer) in bf16: the embedded SmolLM2-135M, or a TinyLlama-1.1B-shaped Llama with
    std-0.02 weights from a seeded generator (the embedded tokenizer, ids folded into its vocab)."""
    from nzrt.cli import model_arg
    lm = model_arg.resolve(None, dtype=torch.bfloat16)
    if model == "smollm2":
        return lm.model, lm.tokenizer
    if model != "llama1.1b":
        raise SystemExit(f"unknown model {model!r}: smollm2 or llama1.1b")
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    m = LlamaForCausalLM._from_config(LlamaConfig(**LLAMA_1B), dtype=torch.bfloat16)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02)
    return m.eval(), lm.tokenizer


def _child(model: str, mode: str, new: int, prompts: int) -> dict:
    """One process, one (model, mode): a warm-up generation, then each prompt once, timed."""
    from nzrt.cli.generate import prompt_ids
    m, tok = _load(model)
    vocab = m.config.vocab_size
    ids = [prompt_ids(tok, p) % vocab for p in PROMPTS[:prompts]]
    if m.generation_config is not None:
        m.generation_config.eos_token_id = None  # always `new` tokens: equal work in every mode

    gaps = []  # per prompt, per step: the two best logits' gap in bf16 ulps of the best

    def gen(x, n, record=False):
        with torch.no_grad():
            out = m.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0, output_scores=record,
                             return_dict_in_generate=True)
        if record:
            g = []
            for sc in out.scores:
                v = sc[0].float().topk(2).values
                ulp = 2.0 ** (math.floor(math.log2(max(abs(float(v[0])), 2.0 ** -126))) - 7)
                g.append(round(float(v[0] - v[1]) / ulp, 2))
            gaps.append(g)
        return out.sequences[0, x.shape[1]:].tolist()

    from nzrt.policies import Fused
    policy = {"nzrt": "auto", "fused": "fused", "fused-cascade": Fused(widths=None)}.get(mode)
    ctx = nzrt.managed(m, policy=policy) if mode != "plain" else None
    if ctx is not None:
        ctx.__enter__()
    try:
        gen(ids[0], 4)  # warm: numba's cache, transformers' first call
        seconds, tokens = 0.0, []
        for x in ids:
            t0 = time.perf_counter()
            tokens.append(gen(x, new))
            seconds += time.perf_counter() - t0
        import psutil
        rss_mib = psutil.Process().memory_info().rss / 2 ** 20  # after generating: what the run holds
        for x in ids:  # once more with the logits kept (untimed): how close the greedy choices were
            gen(x, new, record=True)
    finally:
        if ctx is not None:
            ctx.__exit__(None, None, None)
    return {"tok_s": len(ids) * new / seconds, "tokens": tokens, "gaps": gaps, "rss_mib": rss_mib}


def end_to_end(models: list, rounds: int, new: int, prompts: int) -> None:
    import json
    import statistics
    import subprocess
    import sys
    print(f"\n# end to end: greedy generation, {prompts} prompts (nzrt/data/prompts.txt) x {new} new "
          f"tokens, tokens/s over all of them after a warm-up; each (model, mode) a process of its own, "
          f"the modes interleaved over {rounds} rounds; median; load avg {os.getloadavg()[0]:.2f}")
    hdr = (f"{'model':<10} {'plain tok/s':>11} {'nzrt tok/s':>10} {'fused tok/s':>11} {'cascade tok/s':>13} | "
           f"{'fused/plain':>11} {'cascade/plain':>13} {'nzrt/plain':>10} | {'RSS MiB plain/nzrt/fused/cascade':>32} "
           f"| greedy text fused vs plain")
    print(hdr)
    print("-" * len(hdr))
    for model in models:
        runs: dict = {m: [] for m in MODES}
        toks: dict = {}
        rss: dict = {}
        gaps: dict = {}
        for _ in range(rounds):
            for mode in MODES:
                r = subprocess.run([sys.executable, __file__, "--child", model, mode, str(new), str(prompts)],
                                   capture_output=True, text=True, env=dict(os.environ))
                if r.returncode != 0:
                    raise SystemExit(f"{model} {mode} failed:\n{r.stderr[-3000:]}")
                res = json.loads(r.stdout.strip().splitlines()[-1])
                runs[mode].append(res["tok_s"])
                toks[mode] = res["tokens"]
                gaps[mode] = res["gaps"]
                rss.setdefault(mode, []).append(res["rss_mib"])
        med = {m: statistics.median(v) for m, v in runs.items()}
        same = [a == b for a, b in zip(toks["fused"], toks["plain"])]
        first = [next((i for i, (a, b) in enumerate(zip(f, p)) if a != b), None)
                 for f, p in zip(toks["fused"], toks["plain"])]
        text = f"{sum(same)}/{len(same)} prompts identical" + (
            "" if all(same) else "; first differing token (plain's top-2 gap there, bf16 ulps): " + ", ".join(
                "-" if i is None else f"{i} ({gaps['plain'][j][i]:g})" for j, i in enumerate(first)))
        mem = "/".join(f"{statistics.median(rss[m]):.0f}" for m in MODES)
        if toks["fused"] != toks["fused-cascade"]:
            text += "; FUSED WINDOW AND CASCADE DIFFER (they must not: the same sums)"
        print(f"{model:<10} {med['plain']:>11.2f} {med['nzrt']:>10.2f} {med['fused']:>11.2f} "
              f"{med['fused-cascade']:>13.2f} | {med['fused'] / med['plain']:>10.2f}x "
              f"{med['fused-cascade'] / med['plain']:>12.2f}x {med['nzrt'] / med['plain']:>9.2f}x | {mem:>32} | {text}",
              flush=True)
        print(f"#   runs: " + "; ".join(f"{m} " + ", ".join(f"{v:.2f}" for v in runs[m]) for m in MODES))


def bits_table(models: list) -> None:
    """bits/weight of every weight matrix (2-D and up) of each model in bf16: the planner's code
    against the window code (what ``policy="fused"`` compresses with)."""
    from nzrt.cli import model_arg
    print(f"\n# bits/weight, bf16, every weight matrix of the model (compressed bytes x 8 / weights)")
    hdr = f"{'model':<10} {'weights':>11} | {'smallest code':>13} {'window (4,)':>11} | {'window/smallest':>15}"
    print(hdr)
    print("-" * len(hdr))
    for name in models:
        lm = model_arg.load_embedded(name, dtype=torch.bfloat16)
        n = small = win = 0
        for p in lm.model.parameters():
            if p.dim() < 2:
                continue
            w = p.detach()
            n += w.numel()
            small += nzrt.compress(w).data.numel()
            win += nzrt.compress(w, widths=codec.WINDOW4).data.numel()
        print(f"{name:<10} {n:>11,} | {8 * small / n:>13.2f} {8 * win / n:>11.2f} | {win / small:>14.3f}x", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="smol,llama8b", help="kernel table shapes; '' for none")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--cold", action="store_true", help="rotate copies of each weight (>= 96 MiB)")
    ap.add_argument("--e2e", default="smollm2,llama1.1b", help="models for tokens/s; '' for none")
    ap.add_argument("--bits", default="minilm,smollm2", help="models for the bits/weight table; '' for none")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new", type=int, default=32, help="tokens generated per prompt")
    ap.add_argument("--prompts", type=int, default=len(PROMPTS), help="how many of the prompts")
    ap.add_argument("--child", nargs=4, metavar=("MODEL", "MODE", "NEW", "PROMPTS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        import json
        print(json.dumps(_child(args.child[0], args.child[1], int(args.child[2]), int(args.child[3]))))
        return
    kernel_table(args)
    if args.bits:
        bits_table(args.bits.split(","))
    if args.e2e:
        end_to_end(args.e2e.split(","), args.rounds, args.new, args.prompts)


def kernel_table(args) -> None:
    if not args.shapes:
        return
    batches = [int(b) for b in args.batches.split(",")]
    gen = torch.Generator().manual_seed(0)
    print(f"# {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {cpu_name()}, "
          f"{os.cpu_count()} cores; torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"numba {numba.__version__} ({numba.get_num_threads()} threads), "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}; load avg {os.getloadavg()[0]:.2f}; "
          f"{'cold (weights from DRAM)' if args.cold else 'hot (small weights stay in cache)'}")
    hdr = (f"{'shape':<13} {'K->N':>12} {'rows':>4} {'bits/w':>6} {'MB':>6} | {'fused ms':>9} "
           f"{'GB/s':>6} | {'plain ms':>9} {'GB/s':>6} | {'dec+lin ms':>10} | {'copy ms':>8} "
           f"{'GB/s':>6} | {'plain/fused':>11} | {'bits/w':>6} {'window ms':>9} {'GB/s':>6} | {'plain/window':>11}")
    print(hdr)
    print("-" * len(hdr))
    t_start = time.perf_counter()
    for group in args.shapes.split(","):
        for label, K, N in SHAPES[group]:
            w = (torch.randn(N, K, generator=gen) * 0.02).to(torch.bfloat16)
            ncopy = -(-(96 << 20) // (2 * N * K)) if args.cold else 1
            ws = [w] + [w.clone() for _ in range(ncopy - 1)]
            cts = [nzrt.compress(wi) for wi in ws]
            fws = [cpu_fused.FusedWeight(c) for c in cts]  # prepared once, as the runtime keeps them
            wcts = [nzrt.compress(wi, widths=codec.WINDOW4) for wi in ws]
            wfws = [cpu_fused.FusedWeight(c) for c in wcts]
            cbytes = cts[0].data.numel()
            wbytes = wcts[0].data.numel()
            dense = torch.empty_like(w)
            srcs = [c.data for c in cts]
            dst = torch.empty_like(srcs[0])
            reps = max(3, min(args.reps, int(args.reps * 4e6 / (N * K)) or 3))
            it = iter(range(1 << 62))

            def nxt(seq):
                return seq[next(it) % len(seq)]

            t_copy = median_time(lambda: dst.copy_(nxt(srcs)), max(reps, 5))
            for rows in batches:
                x = torch.randn(rows, K, generator=gen).to(torch.bfloat16)
                out = torch.empty(rows, N, dtype=torch.bfloat16)
                t_fused = median_time(lambda: nxt(fws).linear(x, out=out), reps)
                t_win = median_time(lambda: nxt(wfws).linear(x, out=out), reps)
                t_plain = median_time(lambda: F.linear(x, nxt(ws)), reps)
                t_dec = median_time(lambda: F.linear(x, nzrt.decompress(nxt(cts), out=dense)), reps)
                print(f"{label:<13} {f'{K}->{N}':>12} {rows:>4} {8 * cbytes / (N * K):>6.2f} "
                      f"{cbytes / 1e6:>6.1f} | {t_fused * 1e3:>9.3f} {cbytes / t_fused / 1e9:>6.2f} | "
                      f"{t_plain * 1e3:>9.3f} {2 * N * K / t_plain / 1e9:>6.2f} | {t_dec * 1e3:>10.3f} | "
                      f"{t_copy * 1e3:>8.3f} {cbytes / t_copy / 1e9:>6.2f} | {t_plain / t_fused:>10.2f}x | "
                      f"{8 * wbytes / (N * K):>6.2f} {t_win * 1e3:>9.3f} {wbytes / t_win / 1e9:>6.2f} | "
                      f"{t_plain / t_win:>10.2f}x", flush=True)
            del w, ws, cts, fws, wcts, wfws, dense, srcs, dst
    print(f"# {time.perf_counter() - t_start:.0f} s; load avg after {os.getloadavg()[0]:.2f}; GB/s: "
          f"fused and copy = compressed bytes / time, plain = dense bf16 bytes / time; window: the same "
          f"weight compressed with widths=WINDOW4 (cpu.fused_w4's path)")


if __name__ == "__main__":
    main()
