"""Fused decode-matmul on the CPU: ``numba_cpu.linear`` next to plain torch bf16 ``F.linear``.

    .venv/bin/python tools/bench_fused.py [--shapes smol,llama8b] [--batches 1,4,16] [--reps 7]

Per layer shape (SmolLM2-135M: q/o 576->576, k/v 576->192, gate/up 576->1536, down 1536->576,
head 576->49152; Llama-3-8B: 4096->4096, 4096->14336, 14336->4096) and batch (x rows): the
median time of
  fused     ``numba_cpu.linear(ct, x)``: y = x @ W.T straight from the compressed W;
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

``--cold``: every timed call uses the next of several copies of the weight (dense and compressed),
together >= 96 MiB, so a layer's bytes come from DRAM as in generation (a model streams all its
weights once per token); without it, small layers are re-read from the caches, which flatters
every column and plain most (its dense bytes are 1.5x the compressed).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: its OpenMP threads must not spin

import numba  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import nzrt  # noqa: E402
from nzrt.kernels import numba_cpu  # noqa: E402

SHAPES = {  # name: [(label, in_features K, out_features N)]
    "smol": [("smol q/o", 576, 576), ("smol k/v", 576, 192), ("smol gate/up", 576, 1536),
             ("smol down", 1536, 576), ("smol head", 576, 49152)],
    "llama8b": [("8b q/o", 4096, 4096), ("8b gate/up", 4096, 14336), ("8b down", 14336, 4096)],
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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="smol,llama8b")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--cold", action="store_true", help="rotate copies of each weight (>= 96 MiB)")
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    gen = torch.Generator().manual_seed(0)
    print(f"# {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {cpu_name()}, "
          f"{os.cpu_count()} cores; torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"numba {numba.__version__} ({numba.get_num_threads()} threads), "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}; load avg {os.getloadavg()[0]:.2f}; "
          f"{'cold (weights from DRAM)' if args.cold else 'hot (small weights stay in cache)'}")
    hdr = (f"{'shape':<13} {'K->N':>12} {'rows':>4} {'bits/w':>6} {'MB':>6} | {'fused ms':>9} "
           f"{'GB/s':>6} | {'plain ms':>9} {'GB/s':>6} | {'dec+lin ms':>10} | {'copy ms':>8} "
           f"{'GB/s':>6} | {'plain/fused':>11}")
    print(hdr)
    print("-" * len(hdr))
    t_start = time.perf_counter()
    for group in args.shapes.split(","):
        for label, K, N in SHAPES[group]:
            w = (torch.randn(N, K, generator=gen) * 0.02).to(torch.bfloat16)
            ncopy = -(-(96 << 20) // (2 * N * K)) if args.cold else 1
            ws = [w] + [w.clone() for _ in range(ncopy - 1)]
            cts = [nzrt.compress(wi) for wi in ws]
            cbytes = cts[0].data.numel()
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
                t_fused = median_time(lambda: numba_cpu.linear(nxt(cts), x, out=out), reps)
                t_plain = median_time(lambda: F.linear(x, nxt(ws)), reps)
                t_dec = median_time(lambda: F.linear(x, nzrt.decompress(nxt(cts), out=dense)), reps)
                print(f"{label:<13} {f'{K}->{N}':>12} {rows:>4} {8 * cbytes / (N * K):>6.2f} "
                      f"{cbytes / 1e6:>6.1f} | {t_fused * 1e3:>9.3f} {cbytes / t_fused / 1e9:>6.2f} | "
                      f"{t_plain * 1e3:>9.3f} {2 * N * K / t_plain / 1e9:>6.2f} | {t_dec * 1e3:>10.3f} | "
                      f"{t_copy * 1e3:>8.3f} {cbytes / t_copy / 1e9:>6.2f} | {t_plain / t_fused:>10.2f}x",
                      flush=True)
            del w, ws, cts, dense, srcs, dst
    print(f"# {time.perf_counter() - t_start:.0f} s; load avg after {os.getloadavg()[0]:.2f}; GB/s: "
          f"fused and copy = compressed bytes / time, plain = dense bf16 bytes / time")


if __name__ == "__main__":
    main()
