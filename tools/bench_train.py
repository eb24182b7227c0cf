"""Training memory as the user measures it: plain PyTorch vs nzrt, each row in its own process.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python tools/bench_train.py [--sizes 0.4b,1.1b] [--steps 3]
    python tools/bench_train.py --device cuda [--sizes 8b] [--steps 2]      # on a GPU

Rows (same model, batch and seed; one child process each):

  adamw          plain AdamW: loss.backward(); opt.step(); opt.zero_grad()  (the baseline for ratios)
  adamw_bwd      plain AdamW in backward: one optimizer per parameter, stepped from
                 register_post_accumulate_grad_hook, then zero_grad(set_to_none=True)
  nzrt_adamw     nzrt.managed(model, optimizer=partial(AdamW, ...)): weights and states compressed
  nzrt_sgd       the same with SGD, momentum 0.9
  nzrt_adamw_ds  nzrt AdamW with the states kept dense (OptimizerConfig(compress_states=False))
  lora           peft LoRA r=16 on q/k/v/o, plain base, AdamW over the adapters
  nzrt_lora      the same LoRA on a compressed frozen base (nzrt.managed(model), no optimizer)

On the CPU (default) the models are Llama shapes with std-0.02 bf16 weights written once with
save_pretrained (tools/bench_memory.save_llama) and loaded with transformers' from_pretrained
(memory-mapped). Each child imports torch, transformers (with the Llama code), nzrt (and peft in
the LoRA rows) and warms nzrt's codec before its baseline; peak RSS is the growth over that
baseline over the load, the entry, all steps and the exit (a 5 ms sampler, anon and file apart, and
VmHWM; the notes give the peak of the training alone where the exit's is higher). Step time: the
median of steps 2..n (step 1 allocates the optimizer states). The loss of each step is printed
as the hex of its float32 bits: rows adamw, adamw_bwd, nzrt_adamw, nzrt_adamw_ds must agree bit
for bit (and lora with nzrt_lora); any difference is flagged.

Diagnostics: --trace prints each row's largest phase peaks (forward, the backward up to each weight's
hook, each optimizer step; VmHWM reset at every mark) and malloc's in-use / free-in-arena figures;
--mmap-threshold 65536 sets glibc's MALLOC_MMAP_THRESHOLD_ in every child (freed blocks leave the
process at once); --trim-each calls malloc_trim after each nzrt weight step (from outside the runtime).

--device cuda: the model is built directly on the GPU (random std-0.02 weights from a seeded
generator, no file), default shape Llama-3-8B; peaks are NVML's device memory (whole device,
over the baseline after the CUDA context) and torch.cuda.max_memory_allocated.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SIZES = {  # name: (hidden, intermediate, layers, vocab, kv heads or None for hidden // 256)
    "tiny": (256, 688, 2, 4096, None),
    "0.4b": (1536, 4096, 12, 32000, None),
    "1.1b": (2048, 5632, 22, 32000, None),
    "8b": (4096, 14336, 32, 128256, 8),
}
ROWS = ("adamw", "adamw_bwd", "nzrt_adamw", "nzrt_sgd", "nzrt_adamw_ds", "lora", "nzrt_lora")
LABEL = {"adamw": "plain AdamW", "adamw_bwd": "plain AdamW in backward", "nzrt_adamw": "nzrt AdamW",
         "nzrt_sgd": "nzrt SGD momentum 0.9", "nzrt_adamw_ds": "nzrt AdamW, states dense",
         "lora": "LoRA r=16, plain base", "nzrt_lora": "LoRA r=16, compressed base"}
SAME_LOSS = (("adamw", "adamw_bwd", "nzrt_adamw", "nzrt_adamw_ds"), ("lora", "nzrt_lora"))
NEUZIP = (("NeuZip paper, Llama-3 8B, GPU (vanilla)", 30.97), ("NeuZip paper, LOMO", 19.47),
          ("NeuZip paper, NeuZip (SGD fused in backward)", 15.25))
MiB, GiB = 2 ** 20, 2 ** 30


# -- the child ----------------------------------------------------------------------------------
def _llama_config(size):
    import transformers

    h, inter, layers, vocab, kv = SIZES[size]
    return transformers.LlamaConfig(hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                                    num_attention_heads=h // 64 if size != "8b" else 32,
                                    num_key_value_heads=kv or max(1, h // 256), vocab_size=vocab,
                                    tie_word_embeddings=False, max_position_embeddings=2048)


def _build_on_device(size, device):
    """A Llama built on the GPU itself, std-0.02 weights from a seeded generator (norms 1)."""
    import torch
    import transformers

    cfg = _llama_config(size)
    with torch.device(device):
        model = transformers.LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02, generator=g) if p.dim() >= 2 else p.fill_(1.0)
    return model


def _mallinfo() -> dict | None:
    """glibc's malloc figures now (MiB): in use, free inside its arenas, mmapped; None elsewhere."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]
    try:
        f = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    f.restype = MallInfo2
    m = f()
    return {"arena_in_use": m.uordblks / MiB, "arena_free": m.fordblks / MiB, "mmapped": m.hblkhd / MiB}


def _child(args: dict) -> dict:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import functools

    import torch
    import transformers

    import nzrt
    from nzrt.osmem import reset_peak, rss

    import transformers.models.llama.modeling_llama  # noqa: F401  (in the baseline, as bench_memory)

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from nzrt.cli.profile_child import DeviceMemory, Sampler

    mode, device, lr = args["mode"], args["device"], args["lr"]
    lora = mode in ("lora", "nzrt_lora")
    if lora:
        import peft
    dev = DeviceMemory(device)
    pre = rss()
    nzrt.decompress(nzrt.compress(torch.randn(1 << 16).to(torch.bfloat16)))  # the codec's fixed cost
    if dev.cuda:
        nzrt.decompress(nzrt.compress(torch.randn(1 << 16, device=device).to(torch.bfloat16)))
        torch.cuda.synchronize()
    base = rss()
    base_nvml, _ = dev.now()
    if mode == "imports":
        return {"fixed": base["rss"] - pre["rss"], "fixed_anon": base["anon"] - pre["anon"],
                "fixed_file": base["file"] - pre["file"]}
    s = Sampler(dev)
    hwm_reset = reset_peak()
    dev.reset_peak()
    vocab = SIZES[args["size"]][3]
    ids = torch.randint(0, vocab, (1, args["tokens"]), generator=torch.Generator().manual_seed(0)).to(device)
    out = {"mode": mode}
    s.start()
    run = None
    try:
        t = time.perf_counter()
        if dev.cuda:
            model = _build_on_device(args["size"], device)
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(args["dir"], dtype=torch.bfloat16)
        model.train()
        out["params"] = sum(p.numel() for p in model.parameters())
        out["load_s"] = time.perf_counter() - t
        opt, hooks = None, []
        adamw = functools.partial(torch.optim.AdamW, lr=lr)
        if lora:
            model.requires_grad_(False)
            torch.manual_seed(0)
            cfg = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
            pm = peft.get_peft_model(model, cfg)
            trainable = [p for p in pm.parameters() if p.requires_grad]
            out["trainable"] = sum(p.numel() for p in trainable)
            if mode == "nzrt_lora":
                t = time.perf_counter()
                run = nzrt.managed(pm.base_model.model, device=device).attach()
                out["entry_s"] = time.perf_counter() - t
            opt = torch.optim.AdamW(trainable, lr=lr)
        elif mode == "adamw":
            opt = torch.optim.AdamW(model.parameters(), lr=lr)
        elif mode == "adamw_bwd":
            opts = {p: torch.optim.AdamW([p], lr=lr) for p in model.parameters() if p.requires_grad}

            def hook(p):
                opts[p].step()
                opts[p].zero_grad(set_to_none=True)

            hooks = [p.register_post_accumulate_grad_hook(hook) for p in opts]
        else:
            factory = adamw if mode != "nzrt_sgd" else functools.partial(torch.optim.SGD, lr=lr, momentum=0.9)
            cfg = nzrt.OptimizerConfig(factory, compress_states=mode != "nzrt_adamw_ds")
            t = time.perf_counter()
            run = nzrt.managed(model, device=device, optimizer=cfg).attach()
            out["entry_s"] = time.perf_counter() - t
        s.sample()
        out["after_entry"] = rss()["rss"] - base["rss"]
        marks = []  # --trace: (label, RSS now, peak RSS since the previous mark), over the baseline

        def mark(label):
            if args.get("trace") and hwm_reset:
                m = rss()
                marks.append((label, m["rss"] - base["rss"], m["peak"] - base["rss"]))
                reset_peak()

        if (args.get("trace") or args.get("trim_each")) and run is not None and run.trainer is not None:
            step_one = run.trainer.step_one
            from nzrt.osmem import trim

            def traced(e):  # an instance attribute: the trainer's hooks call self.step_one
                mark(f"backward up to {e.name}")
                step_one(e)
                if args.get("trim_each"):
                    trim()
                mark(f"optimizer step of {e.name}")

            run.trainer.step_one = traced
        losses, times, after = [], [], []
        for i in range(args["steps"]):
            t = time.perf_counter()
            mark("load and entry" if i == 0 else f"between steps {i} and {i + 1}")
            loss = model(input_ids=ids, labels=ids).loss
            mark(f"forward {i + 1}")
            loss.backward()
            mark(f"backward {i + 1} after the last hook")
            if opt is not None:
                opt.step()
                opt.zero_grad()
                mark(f"opt.step() and zero_grad() {i + 1}")
            if dev.cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
            lf = loss.detach().float().cpu().reshape(1)
            losses.append(lf.view(torch.int32).item() & 0xFFFFFFFF)
            out["loss"] = lf.item()
            del loss
            s.sample()
            after.append(rss()["rss"] - base["rss"])
        out["losses"] = [f"{x:08x}" for x in losses]
        out["step_s"] = times
        out["after_step"] = after
        s.sample()
        end = rss()
        out["peak_train"] = max([(end["peak"] if hwm_reset else 0) - base["rss"], s.peak["rss"] - base["rss"]]
                                + [m[2] for m in marks])
        if marks:
            out["trace"] = sorted(marks, key=lambda m: -m[2])[:12]
            out["malloc"] = _mallinfo()
        if run is not None and run.trainer is not None:
            comp, dense = run.trainer.state_bytes()
            out["state_bytes"] = [comp, dense]
        if run is not None:
            out["weights_compressed"] = run.report().weights_compressed_bytes
        if dev.cuda:
            out["torch_peak_train"] = dev.torch_peak()
            out["nvml_peak_train"] = None if s.peak["nvml"] is None else s.peak["nvml"] - base_nvml
        if run is not None:
            t = time.perf_counter()
            run.detach()
            out["exit_s"] = time.perf_counter() - t
            run = None
            s.sample()
            out["after_exit"] = rss()["rss"] - base["rss"]
        for h in hooks:
            h.remove()
    finally:
        if run is not None:
            run.detach()
        s.stop()
    end = rss()
    out["peak"] = max((end["peak"] if hwm_reset else 0) - base["rss"], s.peak["rss"] - base["rss"],
                      out.get("peak_train", 0))
    out["peak_anon"] = s.peak["anon"] - base["anon"]
    out["peak_file"] = s.peak["file"] - base["file"]
    out["base"] = base["rss"]
    if dev.cuda:
        out["torch_peak"] = dev.torch_peak()
        out["nvml_peak"] = None if s.peak["nvml"] is None else s.peak["nvml"] - base_nvml
    return out


# -- the parent ---------------------------------------------------------------------------------
def _run_child(args: dict, timeout=None) -> dict:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    if args.get("mmap_threshold"):  # glibc: blocks from this size are mmapped, freed memory leaves at once
        env["MALLOC_MMAP_THRESHOLD_"] = str(args["mmap_threshold"])
    try:
        r = subprocess.run([sys.executable, __file__, "--child", json.dumps(args)], capture_output=True,
                           text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"mode": args["mode"], "error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        return {"mode": args["mode"], "error": (r.stderr.strip().splitlines() or ["?"])[-1][:300],
                "stderr": r.stderr[-3000:]}
    return json.loads(lines[-1])


def _code_version() -> str:
    """The commit the runtime's code is at, and which of its files differ from it (a shared checkout)."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "nzrt", "kernels", "scheduler",
                                "policies"], capture_output=True, text=True, timeout=10).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    dirty = [ln[3:] for ln in dirty if ln.strip()]
    return (head or "unknown") + (f" + uncommitted changes in {', '.join(dirty)}" if dirty else "")


def _mib(n):
    return "-" if n is None else f"{n / MiB:,.0f}"


def _gib(n):
    return "-" if n is None else f"{n / GiB:,.2f}"


def check_losses(rows) -> list[str]:
    """Each group of rows that must have identical losses: a line per difference (empty: all agree)."""
    by = {r["mode"]: r for r in rows if "losses" in r}
    bad = []
    for group in SAME_LOSS:
        have = [m for m in group if m in by]
        for m in have[1:]:
            if by[m]["losses"] != by[have[0]]["losses"]:
                bad.append(f"{m} losses {by[m]['losses']} != {have[0]} {by[have[0]]['losses']}")
    return bad


def table(size, rows, a, params=None) -> str:
    base = next((r for r in rows if r.get("mode") == "adamw" and "error" not in r), None)
    cuda = a.device != "cpu"
    lines = []
    p = params or next((r.get("params") for r in rows if r.get("params")), None)
    lines.append(f"{size} Llama ({p / 1e9:.2f}B params, {p * 2 / GiB:.2f} GiB bf16), batch 1 x {a.tokens} tokens, "
                 f"{a.steps} steps, lr {a.lr}; " +
                 (f"MALLOC_MMAP_THRESHOLD_={a.mmap_threshold}; " if getattr(a, "mmap_threshold", None) else "") +
                 ("malloc_trim after each nzrt weight step; " if getattr(a, "trim_each", False) else "") + ("device memory over the baseline after the CUDA context, and host RSS growth (GiB)"
                                                    if cuda else "RSS grown over each process's post-import baseline (MiB)")
                 if p else f"{size}")
    if cuda:
        hdr = (f"{'run':30s} {'NVML peak':>9s} {'x AdamW':>7s} {'torch peak':>10s} {'x AdamW':>7s} {'host RSS':>8s} "
               f"{'step s':>7s} {'x AdamW':>7s} {'loss (last, hex)':>17s}  notes")
    else:
        hdr = (f"{'run':30s} {'peak':>7s} {'x AdamW':>7s} {'anon':>7s} {'file':>7s} {'step s':>7s} {'x AdamW':>7s} "
               f"{'loss (last, hex)':>17s}  notes")
    lines += [hdr, "-" * len(hdr)]

    def med(r):
        st = r.get("step_s") or []
        return statistics.median(st[1:] if len(st) > 1 else st) if st else None

    for r in rows:
        name = LABEL.get(r["mode"], r["mode"])
        if "error" in r or "skipped" in r:
            lines.append(f"{name:30s} " + (f"error: {r['error']}" if "error" in r else f"skipped: {r['skipped']}"))
            continue
        ratio = lambda k: (f"{r[k] / base[k]:.2f}" if base and r.get(k) and base.get(k) else "-")  # noqa: E731
        tm, tb = med(r), (med(base) if base else None)
        tratio = f"{tm / tb:.2f}" if tm and tb else "-"
        notes = []
        if "state_bytes" in r:
            c, d = r["state_bytes"]
            notes.append(f"states {_mib(c)} MiB compressed" + (f" + {_mib(d)} dense" if d else ""))
        if "weights_compressed" in r:
            notes.append(f"weights {_mib(r['weights_compressed'])} MiB compressed")
        if "after_entry" in r and r["mode"].startswith("nzrt"):
            notes.append(f"after entry {_mib(r['after_entry'])}")
        if r.get("after_step"):
            notes.append(f"after steps {'/'.join(_mib(x) for x in r['after_step'])}")
        if "after_exit" in r:
            notes.append(f"after exit {_mib(r['after_exit'])}")
        if r.get("peak") and r.get("peak_train") and r["peak"] > r["peak_train"] * 1.01:
            notes.append(f"peak in training {_mib(r['peak_train'])} (exit higher)")
        if "trainable" in r:
            notes.append(f"{r['trainable'] / 1e6:.1f}M trainable")
        if cuda:
            lines.append(f"{name:30s} {_gib(r.get('nvml_peak')):>9s} {ratio('nvml_peak'):>7s} "
                         f"{_gib(r.get('torch_peak')):>10s} {ratio('torch_peak'):>7s} {_gib(r.get('peak')):>8s} "
                         f"{tm or 0:>7.2f} {tratio:>7s} {r['losses'][-1]:>17s}  {'; '.join(notes)}")
        else:
            lines.append(f"{name:30s} {_mib(r.get('peak')):>7s} {ratio('peak'):>7s} {_mib(r.get('peak_anon')):>7s} "
                         f"{_mib(r.get('peak_file')):>7s} {tm or 0:>7.2f} {tratio:>7s} {r['losses'][-1]:>17s}  "
                         f"{'; '.join(notes)}")
    bad = check_losses(rows)
    lines.append("")
    if bad:
        lines += ["!!! LOSSES DIFFER (nzrt must be bit-identical to plain):"] + [f"!!!   {b}" for b in bad]
    else:
        groups = ["/".join(m for m in g if any(r.get("mode") == m and "losses" in r for r in rows)) for g in SAME_LOSS]
        groups = [g for g in groups if "/" in g]
        lines.append(f"identical losses at every step: {', '.join(groups)}: yes" if groups
                     else "no two rows that must agree ran: losses not compared")
    lines.append("")
    lines.append("published, for scale only (GPU, Llama-3 8B, NeuZip paper; a different model and device):")
    for name, gib in NEUZIP:
        lines.append(f"  {name:46s} {gib:6.2f} GiB peak  {gib / NEUZIP[0][1]:.2f}x vanilla")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=None, help="default 0.4b on the CPU, 8b on a GPU; also 1.1b, tiny")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--steps", type=int, default=None, help="default 3 (CPU), 2 (GPU)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--mmap-threshold", type=int, default=None,
                    help="set glibc's MALLOC_MMAP_THRESHOLD_ in every child (e.g. 65536: freed tensors leave "
                         "the process at once instead of staying in malloc's arenas)")
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds for the whole run: each child is stopped at it, rows with < 20 s left are skipped")
    ap.add_argument("--row-timeout", type=float, default=None, help="seconds per child (at most)")
    ap.add_argument("--workdir", default=os.environ.get("NZRT_BENCH_DIR", "/tmp/nzrt-bench-memory"))
    ap.add_argument("--json", default=None, help="write all results here")
    ap.add_argument("--trace", action="store_true",
                    help="nzrt rows: the peak RSS of each phase (forward, backward up to each hook, each optimizer "
                         "step; VmHWM reset at each mark), the largest printed, and malloc's figures at the end")
    ap.add_argument("--trim-each", action="store_true",
                    help="nzrt rows: malloc_trim after each weight's optimizer step (from outside the runtime: "
                         "what giving freed memory back at once would save)")
    ap.add_argument("--no-overhead-row", action="store_true", help="skip the child that measures the fixed overhead")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(_child(json.loads(a.child))))
        return 0
    t0 = time.monotonic()
    cuda = a.device != "cpu"
    a.sizes = a.sizes or ("8b" if cuda else "0.4b")
    a.steps = a.steps or (2 if cuda else 3)
    rows_wanted = a.rows.split(",")
    unknown = set(rows_wanted) - set(ROWS)
    if unknown:
        ap.error(f"unknown rows {sorted(unknown)}; choose from {','.join(ROWS)}")
    common = {"device": a.device, "tokens": a.tokens, "steps": a.steps, "lr": a.lr, "mmap_threshold": a.mmap_threshold,
              "trace": a.trace, "trim_each": a.trim_each}
    fixed = {} if a.no_overhead_row else _run_child(dict(common, mode="imports", size="tiny"),
                                                        timeout=a.row_timeout)
    if fixed:
        print(f"runtime fixed overhead (nzrt's CPU codec loaded): {_mib(fixed.get('fixed'))} MiB RSS "
              f"(anon {_mib(fixed.get('fixed_anon'))}, file {_mib(fixed.get('fixed_file'))}); in every baseline below",
              flush=True)
    results = {"fixed": fixed, "sizes": {}, "code": _code_version()}
    print(f"nzrt code: {results['code']}; load average at start {os.getloadavg()[0]:.2f}", flush=True)
    rc = 0
    for size in a.sizes.split(","):
        if size not in SIZES:
            ap.error(f"unknown size {size!r}; choose from {','.join(SIZES)}")
        d = None
        if not cuda:
            from bench_memory import save_llama

            d = Path(a.workdir) / f"llama-train-{size}"
            if not (d / "config.json").is_file():
                h, inter, layers, vocab, _ = SIZES[size]
                Path(a.workdir).mkdir(parents=True, exist_ok=True)
                save_llama(d, h, inter, layers, vocab=vocab)
        rows = []
        for mode in rows_wanted:
            left = None if a.deadline is None else a.deadline - (time.monotonic() - t0)
            timeout = min(x for x in (a.row_timeout, left, float("inf")) if x is not None)
            if left is not None and left < 20:
                rows.append({"mode": mode, "skipped": f"{a.deadline:.0f} s deadline"})
            elif mode in ("lora", "nzrt_lora") and importlib.util.find_spec("peft") is None:
                rows.append({"mode": mode, "skipped": "peft is not installed"})
            else:
                rows.append(_run_child(dict(common, mode=mode, size=size, dir=str(d) if d else None),
                                       timeout=None if timeout == float("inf") else timeout))
            shown = {k: v for k, v in rows[-1].items() if k != "stderr"}
            print(f"  {size} {mode}: {json.dumps(shown)}", flush=True)
            if "stderr" in rows[-1]:
                print(rows[-1]["stderr"], file=sys.stderr, flush=True)
        results["sizes"][size] = rows
        print()
        print(table(size, rows, a), flush=True)
        for r in rows:
            if r.get("trace"):
                print(f"\n{LABEL.get(r['mode'], r['mode'])}: largest phase peaks (MiB over the baseline; "
                      f"malloc at the end: {json.dumps({k: round(v) for k, v in (r.get('malloc') or {}).items()})})")
                for label, now, peak in r["trace"]:
                    print(f"  {peak / MiB:8,.0f} peak  {now / MiB:8,.0f} at its end  {label}")
        print(flush=True)
        if check_losses(rows) or any("error" in r for r in rows):
            rc = 1
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return rc


if __name__ == "__main__":
    sys.exit(main())
