"""Memory as the user measures it: process RSS of each way to run a model, each in its own process.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python tools/bench_memory.py [--shapes smollm2,gemma3,llama1b]
        [--modes plain,fp_dir,fp_lossy3] [--device cpu]       (--shapes tiny: a smoke run in seconds)

Model shapes (std-0.02 bf16 weights, built with ``XForCausalLM._from_config(cfg, dtype=bfloat16)``
and written once with save_pretrained into --workdir; norms keep the model's own initial values):

  smollm2     SmolLM2-135M-shaped Llama: hidden 576, 30 layers, vocab 49152, tied head
  gemma3      Gemma3-270M-shaped Gemma3ForCausalLM: hidden 640, 18 layers, head_dim 256, vocab
              262144, tied head (the embedding is ~63% of the weights)
  llama1b     1.1B Llama: hidden 2048, 22 layers, vocab 32000, untied head
  llama0.5b   0.5B Llama (hidden 1536, 16 layers; not in the default set), tiny: a smoke shape

One child process per row (default modes: plain, fp_dir, fp_lossy3):

  plain        transformers AutoModelForCausalLM.from_pretrained(dir, dtype=bfloat16) (memory-mapped)
  fp_dir       nzrt.from_pretrained(dir): read one tensor at a time, compressed in RAM
  fp_lossy3    nzrt.from_pretrained(dir, mantissa_bits=3) (lossy: no exactness check)
  fp_nzrt      nzrt.from_pretrained(model.nzrt): blobs stay in the file map
  managed      plain load + one forward, then `nzrt.managed(model)`: entry/exit RSS too
  lossy3       managed with mantissa_bits=3 (restore copies in a temporary file)
  disk         from_pretrained(.nzrt) under the smallest budget auto accepts (the disk tier)
  compress     `nzrt compress dir out.nzrt` (streaming; run when asked for or when fp_nzrt/disk need it)

Baseline: every child imports torch, transformers (generation code, the auto classes and the
model's own modelling module) and nzrt, then takes its baseline -- BEFORE nzrt's numba codec is
loaded (checked: numba is not imported at the baseline). So every nzrt row includes the codec's
fixed cost (numba, llvmlite, the cached kernels), as a user's process pays it; the fixed-cost line
printed first measures that cost alone in a child that only loads the codec.

Each row loads, runs a --tokens forward (its logits' integer view is hashed: exact = the same hash
as plain; lossy rows are not compared) and a --gen-token greedy generate(). Peak RSS is the growth
over the baseline (VmHWM reset through /proc/self/clear_refs, plus a 5 ms sampler for anonymous and
file-backed apart); "load" is the peak up to the end of loading; steady RSS is after the run, the
model alive. On a GPU (--device cuda) NVML's device-memory peak is recorded too.

glibc: nzrt calls ``mallopt(M_MMAP_THRESHOLD)`` only while training (OptimizerConfig), never for
inference. Each nzrt child records any such call; the plain row runs after the nzrt rows with
``MALLOC_MMAP_THRESHOLD_`` set to the value they set (none here: both run glibc's defaults), or to
--plain-mmap-threshold.
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

# name: transformers config (the class's keyword arguments); "arch": llama | gemma3
SHAPES = {
    "smollm2": dict(arch="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                    max_position_embeddings=8192, rope_theta=100000.0),
    "gemma3": dict(arch="gemma3", hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                   num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262144,
                   tie_word_embeddings=True, max_position_embeddings=32768, sliding_window=512,
                   query_pre_attn_scalar=256),
    "llama1b": dict(arch="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                    num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False,
                    max_position_embeddings=2048),
    "llama0.5b": dict(arch="llama", hidden_size=1536, intermediate_size=4096, num_hidden_layers=16,
                      num_attention_heads=24, num_key_value_heads=6, vocab_size=32000, tie_word_embeddings=False,
                      max_position_embeddings=2048),
    "tiny": dict(arch="llama", hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=1, vocab_size=4096, tie_word_embeddings=False,
                 max_position_embeddings=512),
}
DEFAULT_SHAPES = ("smollm2", "gemma3", "llama1b")
SIZE_ALIASES = {"1.1b": "llama1b", "0.5b": "llama0.5b"}  # the old --sizes names
VOCAB = 32000
MODES = ("plain", "fp_dir", "fp_lossy3", "fp_nzrt", "managed", "lossy3", "disk", "compress")
DEFAULT_MODES = ("plain", "fp_dir", "fp_lossy3")
LOSSY = ("fp_lossy3", "lossy3")
NEEDS_NZRT_FILE = ("fp_nzrt", "disk")
LABEL = {"plain": "plain transformers", "fp_dir": "nzrt.from_pretrained(dir)",
         "fp_lossy3": "nzrt.from_pretrained(dir, k=3)", "fp_nzrt": "nzrt.from_pretrained(.nzrt)",
         "managed": "managed(loaded model)", "lossy3": "managed, lossy k=3",
         "disk": "from_pretrained(.nzrt), disk tier", "compress": "nzrt compress dir"}
MiB = 2 ** 20


# -- the child ----------------------------------------------------------------------------------
def _import_model_code(path: str) -> None:
    """Import the model's modelling module (from its config.json's model_type), as a user's
    script does before loading: code, not model memory, so it belongs in the baseline."""
    import transformers
    from transformers.models.auto import modeling_auto

    kind = None
    cfg = Path(path) / "config.json" if path else None
    if cfg is not None and cfg.is_file():
        kind = json.loads(cfg.read_text()).get("model_type")
    name = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(kind or "llama")
    if isinstance(name, (tuple, list)):
        name = name[0]
    getattr(transformers, name)  # imports transformers.models.<arch>.modeling_<arch>


def _child(args: dict) -> dict:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch
    import transformers

    import nzrt
    from nzrt import osmem
    from nzrt.osmem import reset_peak, rss

    import transformers.generation.utils  # noqa: F401  (imports, not model memory: in the baseline,
    import transformers.modeling_utils  # noqa: F401    as nzrt profile does)

    transformers.AutoModelForCausalLM  # noqa: B018  (the auto classes' module)
    _import_model_code(args["dir"])
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from nzrt.cli.profile_child import DeviceMemory, Sampler

    # nzrt's mallopt calls (training sets M_MMAP_THRESHOLD): recorded, so plain can be given the same
    mallopt_calls = []
    set_threshold = osmem.set_mmap_threshold

    def recording(nbytes):
        mallopt_calls.append(int(nbytes))
        return set_threshold(nbytes)

    osmem.set_mmap_threshold = recording

    mode, path, device = args["mode"], args["dir"], args["device"]
    dev = DeviceMemory(device)  # on a GPU the CUDA context exists before any figure (torch's, not nzrt's)
    gc.collect()
    osmem.trim()
    base = rss()  # the baseline: BEFORE nzrt's codec (numba) is loaded; every nzrt row pays for it
    codec_in_base = any(m in sys.modules for m in ("numba", "llvmlite"))
    if mode == "imports":  # the codec's fixed cost alone
        nzrt.decompress(nzrt.compress(torch.randn(1 << 16).to(torch.bfloat16)))
        loaded = rss()
        settle = getattr(osmem, "settle", osmem.trim)
        settle()
        settled = rss()
        return {"mode": mode, "codec_in_base": codec_in_base,
                **{f"loaded_{k}": loaded[k] - base[k] for k in ("rss", "anon", "file")},
                **{f"settled_{k}": settled[k] - base[k] for k in ("rss", "anon", "file")}}
    s = Sampler(dev)  # RSS (and NVML on a GPU) every 5 ms, peaks of each
    hwm_reset = reset_peak()
    vocab = args.get("vocab") or VOCAB
    ids = torch.randint(0, vocab, (1, args["tokens"]), generator=torch.Generator().manual_seed(0)).to(device)
    out = {"mode": mode, "codec_in_base": codec_in_base,
           "malloc_env": os.environ.get("MALLOC_MMAP_THRESHOLD_")}

    def grown(key="rss"):
        return rss()[key] - base[key]

    def peak_so_far():
        return max((rss()["peak"] if hwm_reset else 0), s.peak["rss"]) - base["rss"]

    t_load = time.perf_counter()
    s.start()
    try:
        if mode == "compress":
            from nzrt.loading.compress import compress_model

            st = compress_model(path, args["nzrt"])
            out["seconds"] = time.perf_counter() - t_load
            out["file_bytes"] = st.file_bytes
        else:
            run = None
            if mode in ("plain", "managed", "lossy3"):
                model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()
            elif mode == "fp_dir":
                model = nzrt.from_pretrained(path, device=device)
            elif mode == "fp_lossy3":
                model = nzrt.from_pretrained(path, device=device, mantissa_bits=3)
            elif mode == "fp_nzrt":
                model = nzrt.from_pretrained(args["nzrt"], device=device)
            else:  # disk: the smallest budget auto accepts for the .nzrt
                try:
                    nzrt.from_pretrained(args["nzrt"], device=device, budget=1)
                except nzrt.managed.__globals__["BudgetError"] as e:
                    out["budget"] = e.needed
                model = nzrt.from_pretrained(args["nzrt"], device=device, budget=out["budget"])
            out["load_s"] = time.perf_counter() - t_load
            s.sample()
            out["load_peak"] = peak_so_far()
            out["after_load"] = grown()
            if mode in ("managed", "lossy3"):
                with torch.no_grad():
                    model(ids)  # the model in use before entry: its pages are resident
                s.sample()
                out["before_entry"] = grown()
                run = nzrt.managed(model, device=device,
                                   mantissa_bits=3 if mode == "lossy3" else None).attach()
                out["after_entry"] = grown()
            with torch.no_grad():
                t0 = time.perf_counter()
                logits = model(ids).logits
                out["forward_s"] = time.perf_counter() - t0
                out["prefill_tok_s"] = args["tokens"] / out["forward_s"]
            ints = {2: torch.int16, 4: torch.int32}[logits.element_size()]  # the bits, not the values
            out["logits_dtype"] = str(logits.dtype).replace("torch.", "")
            out["hash"] = hashlib.sha256(logits.contiguous().cpu().view(ints).numpy().tobytes()).hexdigest()
            del logits
            prompt = ids[:, :8]
            t0 = time.perf_counter()
            g = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args["gen"],
                               do_sample=False, min_new_tokens=args["gen"])
            out["gen_tok_s"] = (g.shape[1] - 8) / (time.perf_counter() - t0)
            out["tokens"] = g[0, 8:].tolist()
            del g
            if mode not in ("plain", "managed", "lossy3"):
                rep = nzrt.report(model)
                out["compressed_bytes"] = rep.weights_compressed_bytes
                out["tiers"] = sorted({str(l.tier) for l in rep.layers})
            if run is not None:
                rep = run.report()
                out["compressed_bytes"] = rep.weights_compressed_bytes
                run.detach()
                out["after_exit"] = grown()
            out["steady"] = grown()
            out["steady_anon"] = grown("anon")
            out["steady_file"] = grown("file")
    finally:
        s.stop()
    out["peak"] = peak_so_far()
    out["peak_anon"] = s.peak["anon"] - base["anon"]
    out["peak_file"] = s.peak["file"] - base["file"]
    out["base"] = base["rss"]
    out["mallopt"] = mallopt_calls
    if s.peak["nvml"] is not None:
        out["nvml_peak"] = s.peak["nvml"]
    return out


# -- the parent ---------------------------------------------------------------------------------
def _run_child(args: dict, env_extra: dict | None = None) -> dict:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    env.pop("MALLOC_MMAP_THRESHOLD_", None)  # each row's glibc setting is chosen here, not inherited
    env.update(env_extra or {})
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(args)],
                       capture_output=True, text=True, env=env)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        return {"mode": args["mode"], "error": (r.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(lines[-1])


def save_model(where: Path, arch: str = "llama", **cfg_kwargs) -> Path:
    """A model with std-0.02 bf16 weights written with save_pretrained. Built in bf16 by
    ``_from_config(cfg, dtype=bfloat16)`` (never ``.to(bfloat16)``, which would also cast fp32
    buffers such as rotary tables); matrices drawn again with std 0.02 (seed 0), norms as the model
    initialises them. Written into a temporary folder renamed into place (no half-written model)."""
    import torch
    import transformers

    where = Path(where)
    transformers.utils.logging.disable_progress_bar()
    if arch == "gemma3":
        cls_cfg = getattr(transformers, "Gemma3TextConfig", None)
        cls = getattr(transformers, "Gemma3ForCausalLM", None)
        if cls_cfg is None or cls is None:  # an older transformers: a Llama of the same sizes
            arch = "llama"
            cfg_kwargs = {k: v for k, v in cfg_kwargs.items() if k not in ("sliding_window", "query_pre_attn_scalar")}
        else:
            n = cfg_kwargs["num_hidden_layers"]  # Gemma 3's pattern: 5 sliding-window layers, then 1 global
            cfg_kwargs.setdefault("layer_types", ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                                                  for i in range(n)])
            cfg = cls_cfg(**cfg_kwargs)
    if arch == "llama":
        cfg = transformers.LlamaConfig(**cfg_kwargs)
        cls = transformers.LlamaForCausalLM
    torch.manual_seed(0)
    m = cls._from_config(cfg, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.02)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    tmp = where.with_name(where.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    m.save_pretrained(str(tmp))
    del m
    if where.exists():
        shutil.rmtree(where)
    tmp.rename(where)
    return where


def save_llama(where: Path, h: int, inter: int, layers: int, *, vocab: int = VOCAB, tied: bool = False) -> Path:
    """A Llama with std-0.02 bf16 weights (untied head unless ``tied``) written with save_pretrained
    (tests/test_memory_rss.py builds its model with this)."""
    return save_model(where, "llama", hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=max(1, h // 64), num_key_value_heads=max(1, h // 256),
                      vocab_size=vocab, tie_word_embeddings=tied, max_position_embeddings=2048)


def make_model(where: Path, shape: str) -> Path:
    """The shape's model in ``where``, built unless a finished one of the same shape is there."""
    spec = dict(SHAPES[shape])
    stamp = where / "bench_shape.json"
    if (where / "config.json").is_file() and stamp.is_file() and json.loads(stamp.read_text()) == spec:
        return where
    save_model(where, **dict(spec))
    stamp.write_text(json.dumps(spec))
    return where


def dense_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


def _mib(n):
    return "-" if n is None else f"{n / MiB:,.0f}"


def _ratio(r, plain, key):
    return f"{r[key] / plain[key]:.2f}" if plain and r.get(key) is not None and plain.get(key) else "-"


def print_table(shape: str, d: Path, rows: list, a, plain_env: str | None) -> None:
    plain = next((r for r in rows if r.get("mode") == "plain" and "error" not in r), None)
    cfg = json.loads((d / "config.json").read_text())
    print(f"\n{shape} ({cfg.get('model_type')}, vocab {cfg.get('vocab_size')}, "
          f"{'tied' if cfg.get('tie_word_embeddings') else 'untied'}, {dense_bytes(d) / MiB:,.0f} MiB bf16), "
          f"{a.tokens}-token forward + {a.gen}-token greedy generate; RSS grown over each process's baseline "
          f"(taken after the imports, before nzrt's codec loads), MiB; plain ran with "
          f"{'MALLOC_MMAP_THRESHOLD_=' + plain_env if plain_env else 'glibc defaults (no nzrt row called mallopt)'}")
    hdr = (f"{'run':33s} {'load pk':>7s} {'peak':>6s} {'x plain':>7s} {'anon':>6s} {'file':>6s} "
           f"{'steady':>6s} {'x plain':>7s} {'prefill tok/s':>13s} {'gen tok/s':>9s} {'exact':>5s}  notes")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        if "error" in r:
            print(f"{LABEL.get(r['mode'], r['mode']):33s} error: {r['error']}")
            continue
        if r["mode"] in LOSSY:
            exact = "lossy"
        elif "hash" not in r or not plain:
            exact = "-"
        else:
            exact = "yes" if r["hash"] == plain["hash"] else "NO"
        notes = []
        if r.get("codec_in_base"):
            notes.append("WARNING: the codec was loaded before the baseline")
        if r.get("compressed_bytes"):
            notes.append(f"compressed {_mib(r['compressed_bytes'])}")
        if plain and r is not plain and r.get("tokens") is not None and r.get("tokens") != plain.get("tokens"):
            notes.append("generated tokens differ")
        if r.get("mallopt"):
            notes.append(f"mallopt(M_MMAP_THRESHOLD, {r['mallopt']})")
        if "before_entry" in r:
            notes.append(f"before entry {_mib(r['before_entry'])}, after entry {_mib(r['after_entry'])} "
                         f"({(r['after_entry'] + r['base']) / (r['before_entry'] + r['base']):.2f}x incl. baseline), "
                         f"after exit {_mib(r['after_exit'])}")
        if r.get("budget"):
            notes.append(f"budget {_mib(r['budget'])} MiB; tiers {r.get('tiers')}")
        if r["mode"] == "compress":
            notes.append(f"{r['seconds']:.1f} s, file {_mib(r['file_bytes'])} MiB")
        if r.get("nvml_peak"):
            notes.append(f"NVML peak {_mib(r['nvml_peak'])} MiB")
        print(f"{LABEL.get(r['mode'], r['mode']):33s} {_mib(r.get('load_peak')):>7s} {_mib(r.get('peak')):>6s} "
              f"{_ratio(r, plain, 'peak'):>7s} {_mib(r.get('peak_anon')):>6s} {_mib(r.get('peak_file')):>6s} "
              f"{_mib(r.get('steady')):>6s} {_ratio(r, plain, 'steady'):>7s} "
              f"{r.get('prefill_tok_s', 0):>13.1f} {r.get('gen_tok_s', 0):>9.2f} {exact:>5s}  {'; '.join(notes)}")
    print(flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(DEFAULT_SHAPES),
                    help=f"comma-separated, of {', '.join(SHAPES)} (tiny: a smoke run)")
    ap.add_argument("--sizes", default=None, help=argparse.SUPPRESS)  # the old name: 1.1b, 0.5b
    ap.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"comma-separated, of {', '.join(MODES)}")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--gen", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--plain-mmap-threshold", default="auto",
                    help="MALLOC_MMAP_THRESHOLD_ for the plain row: auto (what nzrt's rows set with mallopt; "
                         "nothing for inference), none, or bytes")
    ap.add_argument("--workdir", default=os.environ.get("NZRT_BENCH_DIR", "/tmp/nzrt-bench-memory"))
    ap.add_argument("--json", default=None, help="write all results here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(_child(json.loads(a.child))))
        return 0
    shapes = [SIZE_ALIASES.get(s, s) for s in (a.sizes or a.shapes).split(",") if s]
    modes = [m for m in a.modes.split(",") if m]
    for bad in [s for s in shapes if s not in SHAPES] + [m for m in modes if m not in MODES]:
        ap.error(f"unknown shape or mode {bad!r}")
    work = Path(a.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    fixed = _run_child({"mode": "imports", "dir": "", "device": a.device, "tokens": 1, "gen": 1})
    if "error" in fixed:
        print(f"codec fixed cost: error: {fixed['error']}", flush=True)
    else:
        print(f"nzrt's codec fixed cost (numba, llvmlite, compiled kernels; a child that only loads it): "
              f"{_mib(fixed['loaded_rss'])} MiB RSS when loaded (anon {_mib(fixed['loaded_anon'])}, file "
              f"{_mib(fixed['loaded_file'])}), {_mib(fixed['settled_rss'])} MiB after osmem.settle (anon "
              f"{_mib(fixed['settled_anon'])}, file {_mib(fixed['settled_file'])}); inside every nzrt row "
              f"below, not in any baseline", flush=True)
    results = {"fixed": fixed, "shapes": {}, "argv": sys.argv[1:]}
    for shape in shapes:
        d = make_model(work / shape, shape)
        nz = work / f"{shape}.nzrt"
        vocab = json.loads((d / "config.json").read_text()).get("vocab_size", VOCAB)
        common = {"dir": str(d), "nzrt": str(nz), "device": a.device, "tokens": a.tokens, "gen": a.gen,
                  "vocab": vocab}
        rows = {}
        if "compress" in modes or (any(m in modes for m in NEEDS_NZRT_FILE) and not nz.is_file()):
            if nz.exists():
                nz.unlink()
            rows["compress"] = _run_child(dict(common, mode="compress"))
            print(f"  {shape} compress: {json.dumps(rows['compress'])}", flush=True)
        # nzrt's rows first: the plain row gets the glibc setting they used (mallopt), if any
        for mode in [m for m in modes if m not in ("compress", "plain")]:
            rows[mode] = _run_child(dict(common, mode=mode))
            print(f"  {shape} {mode}: {json.dumps(rows[mode])}", flush=True)
        plain_env = None
        if a.plain_mmap_threshold == "auto":
            calls = sorted({n for r in rows.values() for n in r.get("mallopt") or ()})
            plain_env = str(calls[-1]) if calls else None
        elif a.plain_mmap_threshold != "none":
            plain_env = str(int(a.plain_mmap_threshold))
        if "plain" in modes:
            rows["plain"] = _run_child(dict(common, mode="plain"),
                                       {"MALLOC_MMAP_THRESHOLD_": plain_env} if plain_env else None)
            print(f"  {shape} plain: {json.dumps(rows['plain'])}", flush=True)
        ordered = [rows[m] for m in MODES if m in rows]  # plain first in the table
        results["shapes"][shape] = {"dense_bytes": dense_bytes(d), "plain_malloc_env": plain_env, "rows": ordered}
        print_table(shape, d, ordered, a, plain_env)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
