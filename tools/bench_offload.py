"""Bigger than memory: nzrt's disk tier against accelerate's disk offload, each run in its own process.

    cd /tmp && /work/main/.venv/bin/python /work/main/tools/bench_offload.py [--shape llama1b|small]
        [--modes plain,accelerate,nzrt_disk,nzrt_disk_fused,nzrt_mem] [--rounds 2] [--gen 8]
        [--budget 250MiB] [--accelerate-max-memory 300MiB] [--cold] [--json out.json]
    quick check: ... --shape small --budget 40MiB --accelerate-max-memory 60MiB --rounds 1

Run it from /tmp (the repository's kernels/ and scheduler/ shadow PyPI packages); children get cwd
/tmp, no PYTHONPATH, OMP_WAIT_POLICY=PASSIVE. Each row (its own process) loads one causal-LM checkpoint
and runs model.generate(do_sample=False) on a 64-token random prompt for --gen new tokens:

  plain            AutoModelForCausalLM.from_pretrained(dir, dtype=bfloat16)
  accelerate       the same with device_map="auto", max_memory={"cpu": --accelerate-max-memory},
                   offload_folder=<workdir>/offload: accelerate's disk offload (the map must hold "disk")
  nzrt_disk        nzrt.from_pretrained(<shape>.nzrt, budget=--budget): the disk tier, exact
  nzrt_disk_fused  <shape>.fused.nzrt (`nzrt compress --fused`: the window code) with policy="fused"
                   (exact weights, not bit-exact arithmetic by design)
  nzrt_mem         nzrt.from_pretrained(dir): compressed in memory, exact

Per row: peak RSS growth (VmHWM reset at the baseline) and steady RSS growth (after generate, model
alive; anon and file apart) over a baseline taken after importing torch, transformers (generation,
auto classes, the model's modelling code), accelerate and nzrt, BEFORE the model or nzrt's codec
loads (nzrt's codec cost is counted); load s; prefill s (generate's start to its first new token:
the prompt forward); tok/s = (gen - 1) decode steps over the time from the first new token to the
last (generate minus prefill, in one call); ratios to plain and accelerate; MiB per token (dense/tok:
plain all weights, accelerate its disk-offloaded weights, nzrt what it decoded; cmp/tok: compressed
bytes nzrt read, from its counters); exact: generated ids and the prompt's last logits (int16 view
of bf16) bit-identical to plain's ("yes"; else NO(ids) or NO(lgt); fused: "weights").

Targets (the issue's table): nzrt_disk tok/s >= 0.8x accelerate, nzrt_disk_fused >= 1.2x
accelerate, nzrt_mem >= 0.5x plain, every peak growth <= 400 MiB. --rounds R runs the modes
interleaved R times: best (max) tok/s and worst (max) peak per mode; every round in --json.
--cold drops the page cache of the model's files before each run (posix_fadvise DONTNEED; pages
still mapped by a live process stay). --device cuda (NEVER RUN HERE, kept minimal): plain on the
GPU, accelerate.cpu_offload, nzrt's host tier; torch.cuda.max_memory_allocated is added.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODES = ("plain", "accelerate", "nzrt_disk", "nzrt_disk_fused", "nzrt_mem")
SMALL = dict(arch="llama", hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
             num_attention_heads=16, num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False,
             max_position_embeddings=2048)
SAVED_LLAMA1B = Path("/tmp/nzrt-bench-memory/llama1b")
TARGETS = (("nzrt_disk", "accelerate", 0.8), ("nzrt_disk_fused", "accelerate", 1.2), ("nzrt_mem", "plain", 0.5))
PEAK_TARGET = 400 * 2 ** 20
MiB = 2 ** 20


def bench_memory():
    """tools/bench_memory.py (tools/ is no package), loaded from the file beside this one."""
    spec = importlib.util.spec_from_file_location("bench_memory", HERE / "bench_memory.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# -- the child: one row ---------------------------------------------------------------------------
def load_model(mode: str, a: dict):
    """The row's model and notes about it (accelerate: its device map)."""
    import torch
    import transformers

    import nzrt

    cuda, auto = a["device"] == "cuda", transformers.AutoModelForCausalLM
    if mode == "plain":
        return auto.from_pretrained(a["dir"], dtype=torch.bfloat16).to(a["device"]).eval(), {}
    if mode == "accelerate" and cuda:
        import accelerate

        model = auto.from_pretrained(a["dir"], dtype=torch.bfloat16).eval()
        return accelerate.cpu_offload(model, execution_device=torch.device("cuda")), {"map": "cpu_offload"}
    if mode == "accelerate":
        model = auto.from_pretrained(a["dir"], dtype=torch.bfloat16, device_map="auto",
                                     max_memory={"cpu": a["accelerate_max_memory"]},
                                     offload_folder=a["offload"]).eval()
        return model, accelerate_map(model)
    if mode == "nzrt_mem":
        return nzrt.from_pretrained(a["dir"], device=a["device"]), {}
    if mode == "nzrt_disk_fused":  # the file in the window code (`nzrt compress --fused`)
        return nzrt.from_pretrained(a["nzrt_fused"], budget=a["budget"], policy="fused", device=a["device"]), {}
    return nzrt.from_pretrained(a["nzrt"], budget=a["budget"], device=a["device"]), {}


def accelerate_map(model) -> dict:
    """hf_device_map's modules per device, and the dense bytes of the weights offloaded to disk
    (read again for every token)."""
    dmap = getattr(model, "hf_device_map", {}) or {}
    counts = dict(Counter(str(dev) for dev in dmap.values()))
    disk = 0
    for name, p in model.named_parameters():
        parts = name.split(".")
        dev = next((dmap[".".join(parts[:i])] for i in range(len(parts), -1, -1) if ".".join(parts[:i]) in dmap), None)
        if str(dev) == "disk":
            disk += p.numel() * p.element_size()
    return {"map": counts, "offloaded_bytes": disk}


def nzrt_counters(model) -> dict | None:
    """nzrt's running totals: dense bytes decoded, compressed bytes read (decodes and fused kernels)."""
    try:
        import nzrt
        from nzrt.runtime.handle import handle_of

        rep = nzrt.report(model)
    except (ImportError, ValueError):
        return None  # not an nzrt model
    fused = getattr(getattr(handle_of(model), "fused_stats", None), "bytes_read", 0) or 0
    return {"decoded": sum(x.decodes * x.dense_bytes for x in rep.layers),
            "compressed": sum(x.decodes * x.compressed_bytes for x in rep.layers) + fused,
            "tiers": sorted({str(x.tier) for x in rep.layers}), "plan": rep.plan}


def make_clock(model):
    """A streamer that times generate: the prompt's put, the first new token (after the prefill;
    nzrt's counters are read then, before its clock), and every later token."""
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self):
            self.times, self.first_counters = [], None

        def put(self, value):
            if len(self.times) == 1:
                self.first_counters = nzrt_counters(model)
            self.times.append(time.perf_counter())

        def end(self):
            pass

    return Clock()


def save_logits(logits, path: str) -> str:
    """The prompt's last logits' bits: an int16 view of bf16 (generate hands them as float32 upcast
    from the model's bf16, which converts back exactly), else int32 of float32."""
    import torch

    x = logits.detach().float().cpu().contiguous()
    b = x.to(torch.bfloat16)
    as16 = torch.equal(b.float(), x)
    (b.view(torch.int16) if as16 else x.view(torch.int32)).numpy().tofile(path)
    return "int16" if as16 else "int32"


def generate(model, a: dict, out: dict) -> None:
    import torch

    ids = torch.randint(0, a["vocab"], (1, a["tokens"]), generator=torch.Generator().manual_seed(0)).to(a["device"])
    clock = make_clock(model)
    with torch.no_grad():
        g = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=a["gen"], min_new_tokens=a["gen"],
                           do_sample=False, streamer=clock, output_logits=True, return_dict_in_generate=True,
                           pad_token_id=0)
    end = nzrt_counters(model)
    t = clock.times  # [prompt put, token 1, ..., token gen]
    out["prefill_s"] = t[1] - t[0]
    steps = len(t) - 2
    out["gen_tok_s"] = steps / (t[-1] - t[1]) if steps > 0 else None
    out["tokens"] = g.sequences[0, a["tokens"]:].tolist()
    out["logits_file"] = f"{a['logits']}.bin"
    out["logits_dtype"] = save_logits(g.logits[0][0], out["logits_file"])
    if end is not None and clock.first_counters is not None and steps > 0:
        out["decoded_per_tok"] = (end["decoded"] - clock.first_counters["decoded"]) / steps
        out["compressed_per_tok"] = (end["compressed"] - clock.first_counters["compressed"]) / steps
        out["tiers"], out["plan"] = end["tiers"], end["plan"]


def child(a: dict) -> dict:
    import torch
    import transformers
    import transformers.generation.utils  # noqa: F401  (code, not model memory: in the baseline)
    import transformers.modeling_utils  # noqa: F401

    import accelerate  # noqa: F401
    from nzrt import osmem  # nzrt is lazy: no codec yet

    transformers.AutoModelForCausalLM  # noqa: B018
    bench_memory()._import_model_code(a["dir"])
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if a["device"] == "cuda":
        torch.zeros(1, device="cuda")  # the CUDA context belongs to the baseline
        torch.cuda.reset_peak_memory_stats()
    gc.collect()
    osmem.trim()
    base = osmem.rss()
    out = {"mode": a["mode"], "codec_in_base": any(m in sys.modules for m in ("numba", "llvmlite")),
           "peak_reset": osmem.reset_peak()}
    t0 = time.perf_counter()
    model, notes = load_model(a["mode"], a)
    out["load_s"] = time.perf_counter() - t0
    out.update(notes)
    generate(model, a, out)
    gc.collect()
    now = osmem.rss()
    out.update({f"steady{'' if k == 'rss' else '_' + k}": now[k] - base[k] for k in ("rss", "anon", "file")})
    out["peak"] = now["peak"] - base["rss"]
    if a["device"] == "cuda":
        out["cuda_peak"] = torch.cuda.max_memory_allocated()
    return out


# -- the parent -----------------------------------------------------------------------------------
def model_dir(shape: str, work: Path) -> Path:
    """The checkpoint directory: llama1b as bench_memory saved it (if there), else built in ``work``."""
    bm = bench_memory()
    if shape == "llama1b" and (SAVED_LLAMA1B / "config.json").is_file():
        return SAVED_LLAMA1B
    if shape in bm.SHAPES:
        return bm.make_model(work / shape, shape)
    d, stamp = work / shape, work / shape / "bench_shape.json"
    if not ((d / "config.json").is_file() and stamp.is_file() and json.loads(stamp.read_text()) == SMALL):
        bm.save_model(d, **SMALL)
        stamp.write_text(json.dumps(SMALL))
    return d


def child_env() -> dict:
    """The children's environment: passive OpenMP waits; PYTHONPATH kept (gpu_all.sh's shim puts
    nzrt on it on a bare GPU machine) without the repository root, which must never be on the path."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    root = str(HERE.parent)
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and os.path.abspath(p) != root]
    env.pop("PYTHONPATH", None)
    if parts:
        env["PYTHONPATH"] = os.pathsep.join(parts)
    return env


def ensure_nzrt(d: Path, nz: Path, *flags: str) -> None:
    """``nzrt compress d nz [flags]`` (run from /tmp) when the file is missing; written under a temporary name."""
    if nz.is_file():
        return
    part = nz.with_name(nz.stem + ".partial.nzrt")
    part.unlink(missing_ok=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "nzrt.cli", "compress", str(d), str(part), *flags], cwd="/tmp", env=child_env(),
                   check=True, stdout=subprocess.DEVNULL)
    part.rename(nz)
    print(f"compressed {d} -> {nz} ({nz.stat().st_size / MiB:,.0f} MiB) in {time.perf_counter() - t0:.0f} s")


def drop_cache(paths) -> bool:
    """posix_fadvise(DONTNEED) on every file under ``paths``; False where the OS has no such call."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for p in paths:
        files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()] if p.is_dir() else []
        for f in files:
            with open(f, "rb") as fh:
                os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return True


def run_child(args: dict, timeout: float) -> dict:
    try:
        r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(args)],
                           capture_output=True, text=True, env=child_env(), cwd="/tmp", timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"mode": args["mode"], "error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        return {"mode": args["mode"], "error": (r.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(lines[-1])


def logits_of(row: dict):
    """(bits, float32 values) of a row's saved logits."""
    import numpy as np

    raw = np.fromfile(row["logits_file"], dtype=np.int16 if row["logits_dtype"] == "int16" else np.int32)
    if raw.dtype == np.int16:
        return raw, (raw.astype(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return raw, raw.view(np.float32)


def exactness(row: dict, plain: dict | None) -> str:
    """yes: ids and last logits bit-identical to plain's; else what differs (fused: "weights")."""
    if plain is None or "tokens" not in row:
        return "-"
    (bits, vals), (pbits, pvals) = logits_of(row), logits_of(plain)
    same_logits = bits.dtype == pbits.dtype and bits.shape == pbits.shape and bool((bits == pbits).all())
    if same_logits and row["tokens"] == plain["tokens"]:
        return "yes"
    row["max_logit_diff"] = float(abs(vals - pvals).max()) if vals.shape == pvals.shape else None
    if row["mode"] == "nzrt_disk_fused":
        return "weights"
    return "NO(ids)" if row["tokens"] != plain["tokens"] else "NO(lgt)"


def aggregate(rounds: list, modes: list) -> dict:
    """Per mode: the best (max) tok/s, the worst (max) peak, every round's exactness; the other
    figures from the round with the best tok/s."""
    out = {}
    for m in modes:
        rows = [rnd[m] for rnd in rounds if m in rnd and "error" not in rnd[m]]
        if not rows:
            out[m] = next(rnd[m] for rnd in rounds if m in rnd)
            continue
        best = dict(max(rows, key=lambda r: r.get("gen_tok_s") or 0))
        best["peak"] = max(r["peak"] for r in rows)
        best["exact"] = "/".join(sorted({str(r.get("exact", "-")) for r in rows}))  # "yes" only if every round was
        out[m] = best
    return out


def _f(x, fmt):
    return "-" if x is None else format(x, fmt)


def _mib(x):
    return _f(None if x is None else x / MiB, ",.0f")


def _ratio(row, ref):
    if not ref or "error" in ref or not row.get("gen_tok_s") or not ref.get("gen_tok_s"):
        return None
    return row["gen_tok_s"] / ref["gen_tok_s"]


def notes_of(row: dict) -> str:
    n = []
    if "map" in row:
        n.append(f"map {row['map']}" + ("" if row.get("offloaded_bytes") or row["map"] == "cpu_offload"
                                        else " WARNING: nothing offloaded to disk"))
    if row.get("tiers"):
        n.append(f"tiers {','.join(row['tiers'])}")
    if row.get("max_logit_diff") is not None:
        n.append(f"max |dlogit| {row['max_logit_diff']:.3g}")
    if row.get("codec_in_base"):
        n.append("WARNING: codec loaded before the baseline")
    if not row.get("peak_reset", True):
        n.append("peak not reset (includes the imports)")
    if row.get("cuda_peak") is not None:
        n.append(f"cuda peak {_mib(row['cuda_peak'])} MiB")
    return "; ".join(n)


def dense_per_tok(row: dict, dense: int):
    return {"plain": dense, "accelerate": row.get("offloaded_bytes")}.get(row["mode"], row.get("decoded_per_tok"))


def print_table(agg: dict, a, d: Path, dense: int, cache: str) -> None:
    print(f"\n{a.shape} ({d}, {dense / MiB:,.0f} MiB bf16), {a.tokens}-token prompt + {a.gen} greedy tokens, "
          f"device {a.device}, page cache {cache}, best of {a.rounds} round(s) (peak: worst); budget {a.budget}, "
          f"accelerate max_memory cpu {a.accelerate_max_memory}; MiB grown over the baseline (after imports, "
          f"before nzrt's codec); gen tok/s over the {a.gen - 1} decode steps after the prompt forward")
    hdr = (f"{'mode':16s} {'load s':>6s} {'peak':>6s} {'steady':>6s} {'anon':>6s} {'file':>6s} {'prefill s':>9s} "
           f"{'tok/s':>7s} {'x plain':>7s} {'x accel':>7s} {'dense/tok':>9s} {'cmp/tok':>7s} {'exact':>7s}  notes")
    print(hdr + "\n" + "-" * len(hdr))
    plain, acc = agg.get("plain"), agg.get("accelerate")
    for m, r in agg.items():
        if "error" in r:
            print(f"{m:16s} error: {r['error']}")
            continue
        print(f"{m:16s} {_f(r['load_s'], '.1f'):>6s} {_mib(r['peak']):>6s} {_mib(r['steady']):>6s} "
              f"{_mib(r['steady_anon']):>6s} {_mib(r['steady_file']):>6s} {_f(r['prefill_s'], '.2f'):>9s} "
              f"{_f(r['gen_tok_s'], '.2f'):>7s} {_f(_ratio(r, plain), '.2f'):>7s} {_f(_ratio(r, acc), '.2f'):>7s} "
              f"{_mib(dense_per_tok(r, dense)):>9s} {_mib(r.get('compressed_per_tok')):>7s} "
              f"{r.get('exact', '-'):>7s}  {notes_of(r)}")
    print("dense/tok: plain all weights, accelerate its disk-offloaded weights, nzrt dense bytes decoded; "
          "cmp/tok: compressed bytes nzrt read per token (decodes + fused kernels)")
    print_targets(agg)


def print_targets(agg: dict) -> None:
    print("targets:")
    for m, ref, want in TARGETS:
        if m in agg and ref in agg:
            x = _ratio(agg[m], agg[ref])
            ok = "-" if x is None else ("ok" if x >= want else "MISSED")
            print(f"  {m} tok/s / {ref} tok/s = {_f(x, '.2f')} (>= {want}) {ok}")
    for m, r in agg.items():
        if "peak" in r:
            print(f"  {m} peak growth {_mib(r['peak'])} MiB (<= {PEAK_TARGET // MiB}) "
                  f"{'ok' if r['peak'] <= PEAK_TARGET else 'MISSED'}")
    print(flush=True)


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama1b", help="llama1b (default), small, or a bench_memory shape")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64, help="prompt tokens")
    ap.add_argument("--gen", type=int, default=8, help="new tokens (>= 2)")
    ap.add_argument("--budget", default="250MiB", help="nzrt's budget for the disk-tier rows")
    ap.add_argument("--accelerate-max-memory", default="300MiB")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--cold", action="store_true", help="drop the model files' page cache before each run")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per child")
    ap.add_argument("--workdir", default=os.environ.get("NZRT_BENCH_DIR", "/tmp/nzrt-bench-offload"))
    ap.add_argument("--json", default=None, help="write every round's rows and the summary here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.modes = [m for m in a.modes.split(",") if m]
    bad = [m for m in a.modes if m not in MODES]
    if bad or a.gen < 2:
        ap.error(f"unknown modes {bad}" if bad else "--gen must be at least 2 (token 1 comes from the prompt forward)")
    if a.device == "cuda" and not a.child and not __import__("torch").cuda.is_available():
        ap.error("--device cuda: torch sees no GPU")
    return a


def main(argv=None) -> int:
    a = parse(argv)
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return 0
    work = Path(a.workdir).resolve()
    (work / "logits").mkdir(parents=True, exist_ok=True)
    d = model_dir(a.shape, work)
    nz, offload = work / f"{a.shape}.nzrt", work / "offload"
    nz_fused = work / f"{a.shape}.fused.nzrt"
    if "nzrt_disk" in a.modes:
        ensure_nzrt(d, nz)
    if "nzrt_disk_fused" in a.modes:
        ensure_nzrt(d, nz_fused, "--fused")
    dense = sum(f.stat().st_size for f in d.glob("*.safetensors"))
    vocab = json.loads((d / "config.json").read_text()).get("vocab_size", 32000)
    common = {"dir": str(d), "nzrt": str(nz), "nzrt_fused": str(nz_fused), "offload": str(offload), "device": a.device, "tokens": a.tokens,
              "gen": a.gen, "vocab": vocab, "budget": a.budget, "accelerate_max_memory": a.accelerate_max_memory}
    cache, rounds = "warm", []
    for i in range(a.rounds):
        rnd = {}
        for m in a.modes:
            if m == "accelerate":
                shutil.rmtree(offload, ignore_errors=True)
            if a.cold:
                cache = "cold (posix_fadvise DONTNEED before each run)" if drop_cache([d, nz, offload]) else \
                    "warm (no posix_fadvise here)"
            rnd[m] = run_child(dict(common, mode=m, logits=str(work / "logits" / f"{m}-r{i}")), a.timeout)
            print(f"  round {i + 1} {m}: " + json.dumps({k: v for k, v in rnd[m].items() if k != "tokens"}), flush=True)
        plain = rnd["plain"] if "error" not in rnd.get("plain", {"error": 1}) else None
        for r in rnd.values():
            if "error" not in r:
                r["exact"] = exactness(r, plain)
        rounds.append(rnd)
    agg = aggregate(rounds, a.modes)
    print_table(agg, a, d, dense, cache)
    if a.json:
        Path(a.json).write_text(json.dumps({"argv": sys.argv[1:], "shape": a.shape, "dir": str(d), "cache": cache,
                                            "dense_bytes": dense, "rounds": rounds, "summary": agg}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
