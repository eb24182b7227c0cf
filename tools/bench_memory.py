"""Memory as the user measures it: process RSS of each way to run a model, each in its own process.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python tools/bench_memory.py [--sizes 0.5b,1.1b] [--device cpu]

For each model size (Llama shapes with std-0.02 bf16 weights, written once with save_pretrained
into --workdir), one child process per row:

  plain        transformers from_pretrained (memory-mapped safetensors)
  fp(dir)      nzrt.from_pretrained(dir): read one tensor at a time, compressed in RAM
  fp(.nzrt)    nzrt.from_pretrained(model.nzrt): blobs stay in the file map
  managed      plain load + one forward, then `with nzrt.managed(model)`: entry/exit RSS too
  lossy k=3    managed with mantissa_bits=3 (restore copies in a temporary file)
  disk tier    from_pretrained(.nzrt) under the smallest budget auto accepts (below the
               compressed size: the disk tier)
and `nzrt compress dir out.nzrt` (streaming).

Every child imports torch, transformers (with the Llama modelling and generation code) and nzrt
and loads nzrt's CPU codec (a small compress and decompress) before its baseline; that fixed cost is measured once on its own line. Peak RSS is
the growth over the baseline (VmHWM reset through /proc/self/clear_refs, plus a 5 ms sampler for
anonymous and file-backed apart); steady RSS is after the run. Each row runs a 64-token forward
(its logits' int16 view is hashed: exact = same hash as plain) and a short greedy generate().
On a GPU (--device cuda) NVML's device-memory peak is recorded too.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SIZES = {  # name: (hidden, intermediate, layers)
    "0.5b": (1536, 4096, 16),
    "1.1b": (2048, 5632, 22),
}
VOCAB = 32000
MODES = ("plain", "fp_dir", "fp_nzrt", "managed", "lossy3", "disk")
LABEL = {"plain": "plain transformers", "fp_dir": "from_pretrained(dir)", "fp_nzrt": "from_pretrained(.nzrt)",
         "managed": "managed(loaded model)", "lossy3": "managed, lossy k=3", "disk": "from_pretrained(.nzrt), disk tier",
         "compress": "nzrt compress dir"}
MiB = 2 ** 20


# -- the child ----------------------------------------------------------------------------------
def _child(args: dict) -> dict:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch
    import transformers

    import nzrt
    from nzrt.osmem import reset_peak, rss

    import transformers.generation.utils  # noqa: F401  (imports, not model memory: in the baseline,
    import transformers.models.llama.modeling_llama  # noqa: F401  as nzrt profile does, ~170 MiB)

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from nzrt.profile_child import DeviceMemory, Sampler

    mode, path, device = args["mode"], args["dir"], args["device"]
    dev = DeviceMemory(device)  # on a GPU the CUDA context exists before any figure (torch's, not nzrt's)
    pre = rss()
    nzrt.decompress(nzrt.compress(torch.randn(1 << 16).to(torch.bfloat16)))  # the codec's fixed cost
    base = rss()
    if mode == "imports":
        return {"fixed": base["rss"] - pre["rss"], "fixed_anon": base["anon"] - pre["anon"],
                "fixed_file": base["file"] - pre["file"]}
    s = Sampler(dev)  # RSS (and NVML on a GPU) every 5 ms, peaks of each
    hwm_reset = reset_peak()
    ids = torch.randint(0, VOCAB, (1, args["tokens"]), generator=torch.Generator().manual_seed(0)).to(device)
    out = {"mode": mode}
    t_load = time.perf_counter()
    s.start()
    try:
        if mode == "compress":
            from nzrt import models

            st = models.compress_model(path, args["nzrt"])
            out["seconds"] = time.perf_counter() - t_load
            out["file_bytes"] = st.file_bytes
        else:
            run = None
            if mode in ("plain", "managed", "lossy3"):
                model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()
            elif mode == "fp_dir":
                model = nzrt.from_pretrained(path, device=device)
            elif mode == "fp_nzrt":
                model = nzrt.from_pretrained(args["nzrt"], device=device)
            else:  # disk: the smallest budget auto accepts for the .nzrt
                try:
                    nzrt.from_pretrained(args["nzrt"], device=device, budget=1)
                except nzrt.managed.__globals__["BudgetError"] as e:
                    out["budget"] = e.needed
                model = nzrt.from_pretrained(args["nzrt"], device=device, budget=out["budget"])
            out["load_s"] = time.perf_counter() - t_load
            if mode in ("managed", "lossy3"):
                with torch.no_grad():
                    model(ids)  # the model in use before entry: its pages are resident
                s.sample()
                out["before_entry"] = rss()["rss"] - base["rss"]
                run = nzrt.managed(model, device=device,
                                   mantissa_bits=3 if mode == "lossy3" else None).attach()
                out["after_entry"] = rss()["rss"] - base["rss"]
            with torch.no_grad():
                t0 = time.perf_counter()
                logits = model(ids).logits
                out["forward_s"] = time.perf_counter() - t0
                out["prefill_tok_s"] = args["tokens"] / out["forward_s"]
            out["hash"] = hashlib.sha256(logits.float().contiguous().cpu().view(torch.int32).numpy().tobytes()).hexdigest()
            del logits
            t0 = time.perf_counter()
            g = model.generate(ids[:, :8], max_new_tokens=args["gen"], do_sample=False, min_new_tokens=args["gen"])
            out["gen_tok_s"] = (g.shape[1] - 8) / (time.perf_counter() - t0)
            if mode not in ("plain", "managed", "lossy3"):
                rep = nzrt.report(model)
                out["compressed_bytes"] = rep.weights_compressed_bytes
                out["tiers"] = sorted({l.tier for l in rep.layers})
            if run is not None:
                rep = run.report()
                out["compressed_bytes"] = rep.weights_compressed_bytes
                run.detach()
                out["after_exit"] = rss()["rss"] - base["rss"]
            out["steady"] = rss()["rss"] - base["rss"]
    finally:
        s.stop()
    end = rss()
    out["peak"] = max((end["peak"] if hwm_reset else 0), s.peak["rss"]) - base["rss"]
    out["peak_anon"] = s.peak["anon"] - base["anon"]
    out["peak_file"] = s.peak["file"] - base["file"]
    out["base"] = base["rss"]
    if s.peak["nvml"] is not None:
        out["nvml_peak"] = s.peak["nvml"]
    return out


# -- the parent ---------------------------------------------------------------------------------
def _run_child(args: dict) -> dict:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    r = subprocess.run([sys.executable, __file__, "--child", json.dumps(args)], capture_output=True, text=True,
                       env=env)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        return {"mode": args["mode"], "error": (r.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(lines[-1])


def make_model(where: Path, size: str) -> Path:
    if (where / "config.json").is_file():
        return where
    return save_llama(where, *SIZES[size], vocab=VOCAB)


def save_llama(where: Path, h: int, inter: int, layers: int, *, vocab: int = VOCAB) -> Path:
    """A Llama with std-0.02 bf16 weights (untied head) written with save_pretrained."""
    import torch
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                                   num_attention_heads=h // 64, num_key_value_heads=max(1, h // 256),
                                   vocab_size=vocab, tie_word_embeddings=False, max_position_embeddings=2048)
    torch.manual_seed(0)
    with torch.device("meta"):
        m = transformers.LlamaForCausalLM(cfg)
    m = m.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02) if p.dim() >= 2 else p.fill_(1.0)
    m.save_pretrained(str(where))
    return where


def _mib(n):
    return "-" if n is None else f"{n / MiB:,.0f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="0.5b,1.1b")
    ap.add_argument("--modes", default=",".join(MODES + ("compress",)))
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--gen", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workdir", default=os.environ.get("NZRT_BENCH_DIR", "/tmp/nzrt-bench-memory"))
    ap.add_argument("--json", default=None, help="write all results here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(_child(json.loads(a.child))))
        return 0
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    modes = a.modes.split(",")
    fixed = _run_child({"mode": "imports", "dir": "", "device": a.device, "tokens": 1, "gen": 1})
    print(f"runtime fixed overhead (nzrt's CPU codec loaded: numba, llvmlite, compiled kernels): "
          f"{_mib(fixed.get('fixed'))} MiB RSS (anon {_mib(fixed.get('fixed_anon'))}, file {_mib(fixed.get('fixed_file'))}); "
          f"in every baseline below", flush=True)
    results = {"fixed": fixed, "sizes": {}}
    for size in a.sizes.split(","):
        d = make_model(work / f"llama-{size}", size)
        nz = work / f"llama-{size}.nzrt"
        dense = (d / "model.safetensors").stat().st_size
        common = {"dir": str(d), "nzrt": str(nz), "device": a.device, "tokens": a.tokens, "gen": a.gen}
        rows = []
        if "compress" in modes or not nz.is_file():
            if nz.exists():
                nz.unlink()
            rows.append(_run_child(dict(common, mode="compress")))
            print(f"  {size} compress: {rows[-1]}", flush=True)
        for mode in modes:
            if mode == "compress":
                continue
            rows.append(_run_child(dict(common, mode=mode)))
            print(f"  {size} {mode}: {json.dumps(rows[-1])}", flush=True)
        results["sizes"][size] = {"dense_bytes": dense, "rows": rows}
        plain = next((r for r in rows if r.get("mode") == "plain" and "error" not in r), None)
        print(f"\n{size} Llama ({dense / 2 ** 30:.2f} GiB bf16), {a.tokens}-token forward + {a.gen}-token generate, "
              f"RSS grown over each process's post-import baseline (MiB)")
        hdr = (f"{'run':34s} {'peak':>7s} {'x plain':>7s} {'anon':>7s} {'file':>7s} {'steady':>7s} "
               f"{'prefill tok/s':>13s} {'gen tok/s':>9s} {'exact':>5s}  notes")
        print(hdr)
        print("-" * len(hdr))
        for r in rows:
            if "error" in r:
                print(f"{LABEL.get(r['mode'], r['mode']):34s} error: {r['error']}")
                continue
            ratio = f"{r['peak'] / plain['peak']:.2f}" if plain and r.get("peak") else "-"
            exact = "-" if "hash" not in r or not plain else ("yes" if r["hash"] == plain["hash"] else "no")
            notes = []
            if "before_entry" in r:
                notes.append(f"before entry {_mib(r['before_entry'])}, after entry {_mib(r['after_entry'])} "
                             f"({(r['after_entry'] + r['base']) / (r['before_entry'] + r['base']):.2f}x incl. baseline), "
                             f"after exit {_mib(r['after_exit'])}")
            if r.get("budget"):
                notes.append(f"budget {_mib(r['budget'])} MiB < compressed {_mib(r.get('compressed_bytes'))}; tiers {r.get('tiers')}")
            if r["mode"] == "compress":
                notes.append(f"{r['seconds']:.1f} s, file {_mib(r['file_bytes'])} MiB")
            if r.get("nvml_peak"):
                notes.append(f"NVML peak {_mib(r['nvml_peak'])} MiB")
            print(f"{LABEL.get(r['mode'], r['mode']):34s} {_mib(r.get('peak')):>7s} {ratio:>7s} "
                  f"{_mib(r.get('peak_anon')):>7s} {_mib(r.get('peak_file')):>7s} {_mib(r.get('steady')):>7s} "
                  f"{r.get('prefill_tok_s', 0):>13.1f} {r.get('gen_tok_s', 0):>9.2f} {exact:>5s}  {'; '.join(notes)}")
        print(flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
