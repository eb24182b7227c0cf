"""GPU benchmark of the Triton backend: correctness on the device, then decode throughput against a
plain copy kernel moving the same bytes, per-block (one launch) vs per-tensor decoding, and the
encode time of one transformer block. Made to run in ONE call on an H100-class GPU:

    python tools/bench_gpu.py                 # correctness + throughput table
    python tools/bench_gpu.py --record        # ... and append the table to BENCHMARKS.md
    python tools/bench_gpu.py --static        # no GPU needed: compile the decode kernel for sm_90
                                              # offline and print registers / SASS per value

The figure of merit is decode time vs copy time for the same bytes (read the compressed blob +
write the dense tensor): ``ratio = copy_ms / decode_ms`` (1.0 = decoding at copy bandwidth).
Also measured: the planner's cascade against forced shallower ones on the same tensor (bits per
weight vs decode speed: the decode kernel is expected to be ALU-bound, ~20 instructions per value
per level reached), one launch per block vs one per tensor, and the encode time of one block.
Exit status: 0 all exact, 1 a mismatch, 2 no CUDA device.
Weights are drawn N(0, 0.02) in bf16, shaped like Llama-3-8B's layers.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_MD = os.path.join(ROOT, "BENCHMARKS.md")

# Llama-3-8B: one decoder block (q, k, v, o, gate, up, down) and the embedding / lm_head
BLOCK_SHAPES = {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "v_proj": (1024, 4096),
                "o_proj": (4096, 4096), "gate_proj": (14336, 4096), "up_proj": (14336, 4096),
                "down_proj": (4096, 14336)}
LAYER_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (128256, 4096)]
CONFIGS = [(256, 1), (512, 2), (512, 4), (1024, 4), (1024, 8), (2048, 4), (2048, 8), (4096, 8)]


def _die(msg: str, code: int = 2):
    print(f"bench_gpu: {msg}", file=sys.stderr)
    sys.exit(code)


# ---------------------------------------------------------------------------------------------
# static analysis (no GPU): compile for sm_90 and count SASS instructions in the decode loop
# ---------------------------------------------------------------------------------------------

def static_report(configs=CONFIGS):
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from nzrt.kernels import triton as tg
    from nzrt.kernels.triton import decode as tgd

    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    sig = {"blob_ptr": "*u8", "out_ptr": "*i16", "sym_ptr": "*i32", "n": "i32", "tile": "i32",
           "sm_off": "i32", "off_off": "i32", "l0_off": "i32", "l1_off": "i32", "l2_off": "i32",
           "l3_off": "i32", "l4_off": "i32"}
    div16 = [k for k in sig if k not in ("n",)]
    cascades = {"(2,2,2,3)+raw": ((2, 2, 2, 3, 8), 5, 4), "(2,2,5)": ((2, 2, 5), 3, 3),
                "(3,5)": ((3, 5), 2, 2), "(4)+raw": ((4, 8), 2, 1)}
    print(f"{'cascade':16s} {'BLOCK':>6s} {'warps':>5s} {'regs':>5s} {'loop instr/value':>17s}")
    for name, (ws, nl, nc) in cascades.items():
        W = list(ws) + [1] * (5 - len(ws))
        first = [0]
        for w in ws[:nc]:
            first.append(first[-1] + (1 << w) - 1)
        first += [0] * 4
        for blk, warps in configs:
            const = dict(W0=W[0], W1=W[1], W2=W[2], W3=W[3], W4=W[4], F1=first[1], F2=first[2],
                         F3=first[3], N_LEVELS=nl, N_CODED=nc, KEEP=7, MAN=7, TOTAL=16, BLOCK=blk)
            names = list(sig)
            attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in div16}
            src = ASTSource(fn=tgd._decode_kernel, signature={**sig, **{k: "constexpr" for k in const}},
                            constexprs=const, attrs=attrs)
            c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(c.asm["cubin"])
                f.flush()
                ru = subprocess.run([os.path.join(bindir, "cuobjdump"), "--dump-resource-usage", f.name],
                                    capture_output=True, text=True).stdout
                sass = subprocess.run([os.path.join(bindir, "cuobjdump"), "-sass", f.name],
                                      capture_output=True, text=True).stdout
            regs = re.search(r"REG:(\d+)", ru).group(1)
            loops = []
            for addr, ins in re.findall(r"/\*([0-9a-f]{4})\*/\s+(.*?);", sass):
                m = re.search(r"BRA (?:`\(\.L_x_\d+\) )?0x([0-9a-f]+)", ins)
                if m and int(m.group(1), 16) < int(addr, 16):
                    loops.append((int(addr, 16) - int(m.group(1), 16)) // 16)
            per_value = max(loops) / (blk / (32 * warps)) if loops else float("nan")
            print(f"{name:16s} {blk:6d} {warps:5d} {regs:>5s} {per_value:17.1f}")
    print("(all levels taken; deep levels are skipped per sub-block when no value reaches them)")


# ---------------------------------------------------------------------------------------------
# GPU benchmark
# ---------------------------------------------------------------------------------------------

def _env():
    import torch
    import triton
    dev = "CPU (smoke test, TRITON_INTERPRET=1)" if SMOKE else torch.cuda.get_device_name()
    from nzrt.cli.env import driver_version
    driver = driver_version()
    return dict(device=dev, driver=driver, torch=torch.__version__, triton=triton.__version__,
                cuda=torch.version.cuda, python=platform.python_version(),
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


def _copy_kernel_factory():
    import triton
    import triton.language as tl

    @triton.jit
    def _copy_kernel(src_ptr, dst_ptr, n_src, n_dst, BLOCK: tl.constexpr):
        """Read n_src int32 words, write n_dst int32 words: the bytes a decode moves."""
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        v = tl.load(src_ptr + i, mask=i < n_src, other=0)
        tl.store(dst_ptr + i, v, mask=i < n_dst)

    return _copy_kernel


SMOKE = False  # --smoke: run every step on the CPU under TRITON_INTERPRET=1 with tiny shapes


def _bench(fn, rep_ms=200):
    if SMOKE:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")


def _sync():
    import torch
    if not SMOKE:
        torch.cuda.synchronize()


def run(args):
    import torch
    if SMOKE:
        global LAYER_SHAPES, BLOCK_SHAPES, CONFIGS
        LAYER_SHAPES = [(64, 96), (128, 200)]
        BLOCK_SHAPES = {k: (v[0] // 256, v[1] // 256) for k, v in BLOCK_SHAPES.items()}
        CONFIGS = [(65536, 4)]
    elif not torch.cuda.is_available():
        _die("no CUDA device: this benchmark needs an NVIDIA GPU (torch.cuda.is_available() is "
             "False). Use --static for an offline compile report, or run the interpreter tests "
             "(tests/test_triton_interpret.py).")
    if not SMOKE and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        _die("TRITON_INTERPRET is set; unset it to benchmark the compiled kernels")
    import triton

    import nzrt
    from nzrt.format import CompressedTensor
    from nzrt.kernels import reference as ref
    from nzrt.kernels import spec
    from nzrt.kernels import triton as tg
    from nzrt.kernels.triton import decode as tgd

    dev = torch.device("cpu" if SMOKE else "cuda")
    env = _env()
    lines = []

    def out(s=""):
        print(s, flush=True)
        lines.append(s)

    out(f"device: {env['device']} · driver {env['driver']} · CUDA {env['cuda']} · torch {env['torch']} "
        f"· triton {env['triton']} · {env['date']}")
    t_start = time.time()

    # -- 1. correctness on the device ---------------------------------------------------------
    out("\n### Correctness on the device (bit-exact vs the numpy reference)")
    out("| case | encode bytes == reference | decode == reference |")
    out("|---|---|---|")
    all16 = np.arange(1 << 16, dtype=np.uint16)
    failures = 0

    def check(name, bits_np, layout, keep, tile, compare_encode=True):
        nonlocal failures
        it = torch.int16 if layout.itemsize == 2 else torch.int32
        sint = np.int16 if layout.itemsize == 2 else np.int32
        d_bits = torch.from_numpy(bits_np.view(sint)).to(dev)
        got = tg.encode(d_bits, layout, keep, tile)
        enc_ok = "skipped"
        if compare_encode:
            want = ref.encode(bits_np, layout, keep, tile)
            enc_ok = (got[0] == want[0] and got[1] == want[1] and np.array_equal(got[2], want[2])
                      and list(got[3]) == list(want[3])
                      and all(np.array_equal(got[3][k], want[3][k]) and got[3][k].dtype == want[3][k].dtype
                              for k in want[3]))
        ct = CompressedTensor.from_sections(
            dict(dtype=layout.name, shape=(len(bits_np),), mantissa_bits=keep, tile=tile,
                 widths=got[0], has_raw=got[1], symbols=tuple(int(s) for s in got[2])), got[3])
        expect = np.zeros(len(bits_np), layout.uint)
        ref.decode_into(ct, expect)
        dct = ct.to(dev)
        o = torch.full((len(bits_np),), 0x5A5A, dtype=it, device=dev)
        tg.decode_into(dct, o)
        dec_ok = np.array_equal(o.cpu().numpy().view(layout.uint), expect)
        if keep == layout.man_bits:
            dec_ok = dec_ok and np.array_equal(expect, bits_np)
        failures += (enc_ok is False) + (not dec_ok)
        out(f"| {name} | {enc_ok} | {dec_ok} |")

    bf16, fp16 = spec.LAYOUTS["bfloat16"], spec.LAYOUTS["float16"]
    for tile in (8192, 65536):
        check(f"all 65536 bf16 patterns, tile {tile}", all16, bf16, 7, tile)
        check(f"all 65536 fp16 patterns, tile {tile}", all16, fp16, 10, tile)
    for keep in (0, 3):
        check(f"all bf16 patterns, mantissa_bits={keep}", all16, bf16, keep, 8192)
    g = torch.Generator(device="cpu").manual_seed(0)
    for n in (1, 8191, 8193, 100_003):
        x = (torch.randn(n, generator=g) * 0.02).bfloat16()
        check(f"N(0,0.02) bf16 n={n}", x.view(torch.int16).numpy().view(np.uint16), bf16, 7, 8192)
    for shape in LAYER_SHAPES:  # full-size roundtrip on the device, bytes vs reference on a slice
        x = torch.randn(shape, device=dev, dtype=torch.float32).mul_(0.02).to(torch.bfloat16)
        ct = nzrt.compress(x, backend="triton")
        y = torch.full_like(x, float("nan"))
        nzrt.decode_into(ct, y, backend="triton")
        ok = torch.equal(y.view(torch.int16), x.view(torch.int16))
        sl = x.reshape(-1)[:1 << 20].cpu().view(torch.int16).numpy().view(np.uint16)
        want = ref.encode(sl, bf16, 7, 8192)
        got = tg.encode(torch.from_numpy(sl.view(np.int16)).to(dev), bf16, 7, 8192)
        enc_ok = all(np.array_equal(got[3][k], want[3][k]) for k in want[3]) and got[:2] == want[:2]
        failures += (not ok) + (not enc_ok)
        out(f"| N(0,0.02) bf16 {shape[0]}x{shape[1]} roundtrip ({ct.bits_per_weight:.2f} bits/weight, "
            f"widths {ct.header.widths}{'+raw' if ct.header.has_raw else ''}) | {enc_ok} (first 1Mi) | {ok} |")
        del x, y, ct
        _sync()

    # -- 2. decode throughput vs copy ---------------------------------------------------------
    copy_kernel = _copy_kernel_factory()
    out("\n### Decode throughput vs a copy kernel moving the same bytes (read compressed + write dense)")
    out("| tensor | bits/weight | cascade | best BLOCK/warps | decode ms | copy ms | decode GB/s (in+out) "
        "| dense GB/s | ratio copy/decode |")
    out("|---|---|---|---|---|---|---|---|---|")
    best_cfg = None
    for shape in LAYER_SHAPES:
        x = torch.randn(shape, device=dev, dtype=torch.float32).mul_(0.02).to(torch.bfloat16)
        ct = nzrt.compress(x, backend="triton")
        y = torch.empty_like(x)
        flat = y.view(-1).view(torch.int16)
        results = {}
        for blk, warps in CONFIGS:
            try:
                results[(blk, warps)] = _bench(lambda: tg.decode_into(ct, flat, block=blk, num_warps=warps))
            except Exception as e:  # noqa: BLE001 - a config that does not compile is skipped
                print(f"  config BLOCK={blk} warps={warps} failed: {e!r}"[:200])
        (blk, warps), ms = min(results.items(), key=lambda kv: kv[1])
        if shape == (4096, 14336):
            best_cfg = (blk, warps)
        nin, nout = ct.data.numel(), x.numel() * 2
        src = ct.data[: nin // 4 * 4].view(torch.int32)
        dst = flat.view(torch.int32) if (x.numel() % 2 == 0) else None
        cb = 4096
        grid = (triton.cdiv(max(src.numel(), nout // 4), cb),)
        copy_ms = _bench(lambda: copy_kernel[grid](src, dst, src.numel(), nout // 4, BLOCK=cb))
        gbs = (nin + nout) / ms / 1e6
        cas = f"{ct.header.widths}{'+raw' if ct.header.has_raw else ''}"
        out(f"| {shape[0]}x{shape[1]} | {ct.bits_per_weight:.2f} | {cas} | {blk}/{warps} | {ms:.3f} | "
            f"{copy_ms:.3f} | {gbs:.0f} | {nout / ms / 1e6:.0f} | {copy_ms / ms:.2f} |")
        sweep = ", ".join(f"{b}/{w}: {t:.3f}" for (b, w), t in sorted(results.items()))
        print(f"    sweep (BLOCK/warps: ms) {sweep}")
        del x, y, ct
        _sync()
    out(f"(torch dense copy for scale: see copy ms; decode configs swept: {CONFIGS})")

    # -- 2b. the planner's cascade vs cheaper-to-decode ones, same tensor ----------------------
    out("\n### Bits vs decode speed: the planner's cascade and forced alternatives (4096x14336, N(0,0.02) bf16)")
    out("| cascade | bits/weight | decode ms (best of BLOCK/warps) | copy ms | ratio copy/decode | exact |")
    out("|---|---|---|---|---|---|")
    shape = (4096, 14336) if not SMOKE else LAYER_SHAPES[-1]
    x = torch.randn(shape, device=dev, dtype=torch.float32).mul_(0.02).to(torch.bfloat16)
    xb = x.view(-1).view(torch.int16)
    lay = spec.LAYOUTS["bfloat16"]
    y = torch.empty_like(x)
    flat = y.view(-1).view(torch.int16)
    for forced in (None, (2, 2, 2, 5), (2, 2, 5), (3,), (4,)):
        w, has_raw, symbols, sections = tg.encode(xb, lay, 7, spec.DEFAULT_TILE, widths=forced)
        ct = CompressedTensor.from_sections(
            dict(dtype="bfloat16", shape=tuple(shape), mantissa_bits=7, tile=spec.DEFAULT_TILE,
                 widths=w, has_raw=has_raw, symbols=tuple(int(v) for v in symbols)), sections).to(dev)
        flat.fill_(0x5A5A)
        tg.decode_into(ct, flat)
        exact = torch.equal(flat, xb)
        failures += not exact
        ms = min(_bench(lambda: tg.decode_into(ct, flat, block=b, num_warps=nw))
                 for b, nw in ([(256, 1), (1024, 4), (2048, 8)] if not SMOKE else CONFIGS))
        nin, nout = ct.data.numel(), x.numel() * 2
        src = ct.data[: nin // 4 * 4].view(torch.int32)
        grid = (triton.cdiv(max(src.numel(), nout // 4), 4096),)
        copy_ms = _bench(lambda: copy_kernel[grid](src, flat.view(torch.int32), src.numel(), nout // 4, BLOCK=4096))
        name = f"{w}{'+raw' if has_raw else ''}" + (" (planner)" if forced is None else "")
        out(f"| {name} | {ct.bits_per_weight:.2f} | {ms:.3f} | {copy_ms:.3f} | {copy_ms / ms:.2f} | {exact} |")
        del ct
    del x, y
    _sync()

    # -- 3. one launch per block vs per tensor; encode time of one block -----------------------
    out("\n### One Llama-3-8B block (q, k, v, o, gate, up, down; 218M weights)")
    xs, cts, enc_s = {}, {}, 0.0
    for name, shape in BLOCK_SHAPES.items():
        xs[name] = torch.randn(shape, device=dev, dtype=torch.float32).mul_(0.02).to(torch.bfloat16)
    _sync()
    for rep in range(2):  # first pass compiles the kernels
        t0 = time.perf_counter()
        for name in BLOCK_SHAPES:
            cts[name] = nzrt.compress(xs[name], backend="triton")
        _sync()
        enc_s = time.perf_counter() - t0
    lay = spec.LAYOUTS["bfloat16"]
    t0 = time.perf_counter()
    for name in BLOCK_SHAPES:  # the kernel side alone: histogram, plan, scatter, pack, D2H
        tg.encode(xs[name].view(-1).view(torch.int16), lay, 7, spec.DEFAULT_TILE)
    _sync()
    enc_dev_s = time.perf_counter() - t0
    outs = {k: torch.empty_like(v) for k, v in xs.items()}
    flats = [outs[k].view(-1).view(torch.int16) for k in BLOCK_SHAPES]
    clist = [cts[k] for k in BLOCK_SHAPES]
    blk, warps = best_cfg or (tg.DECODE_BLOCK, tg.DECODE_WARPS)
    t_many = _bench(lambda: tg.decode_many(clist, flats, block=blk, num_warps=warps))
    t_each = _bench(lambda: [tg.decode_into(c, f, block=blk, num_warps=warps) for c, f in zip(clist, flats)])
    ok = all(torch.equal(outs[k].view(torch.int16), xs[k].view(torch.int16)) for k in BLOCK_SHAPES)
    tg.decode_many(clist, flats, block=blk, num_warps=warps)
    _sync()
    ok = ok and all(torch.equal(outs[k].view(torch.int16), xs[k].view(torch.int16)) for k in BLOCK_SHAPES)
    failures += not ok
    sigs = {tuple(sorted(tgd._signature(c.header).items())) for c in clist}
    n_w = sum(x.numel() for x in xs.values())
    comp_bytes = sum(c.nbytes for c in clist)
    out("| what | value |")
    out("|---|---|")
    out(f"| compressed size | {comp_bytes / 2**20:.1f} MiB ({8 * comp_bytes / n_w:.2f} bits/weight) |")
    out(f"| decode_many: launches for the block | {len(sigs)} |")
    out(f"| decode_many (one launch per signature), ms | {t_many:.3f} ({n_w * 2 / t_many / 1e6:.0f} GB/s dense) |")
    out(f"| decode_into x7 (one launch per tensor), ms | {t_each:.3f} |")
    out(f"| decode results bit-exact | {ok} |")
    out(f"| encode, nzrt.compress(backend='triton') x7 (kernels + host blob/CRC + H2D), s | {enc_s:.2f} |")
    out(f"| encode, triton.encode x7 (kernels + sections to host), s | {enc_dev_s:.2f} |")
    out(f"\nwall time {time.time() - t_start:.0f} s; failures: {failures}")
    return lines, env, failures


def record(lines, env, argv):
    cmd = "python tools/bench_gpu.py " + " ".join(argv)
    head = (f"\n## Triton backend on {env['device']} ({env['date']})\n\n"
            f"driver {env['driver']} · CUDA {env['cuda']} · torch {env['torch']} · triton {env['triton']} "
            f"· python {env['python']}  \ncommand: `{cmd.strip()}`\n\n")
    with open(BENCH_MD, "a") as f:
        f.write(head + "\n".join(lines[1:]) + "\n")
    print(f"appended to {BENCH_MD}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--record", action="store_true", help="append the results to BENCHMARKS.md")
    p.add_argument("--smoke", action="store_true",
                   help="exercise every step on the CPU under TRITON_INTERPRET=1 with tiny shapes "
                        "(checks the script, not the GPU; numbers are meaningless)")
    p.add_argument("--static", action="store_true",
                   help="no GPU: compile the decode kernel for sm_90 and report SASS per value")
    a = p.parse_args(argv)
    if a.smoke:
        global SMOKE
        SMOKE = True
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernel module is imported
        if a.record:
            _die("--smoke numbers are not benchmarks; refusing to --record them")
    if a.static:
        static_report()
        return 0
    lines, env, failures = run(a)
    if a.record:
        record(lines, env, argv)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
