"""The Triton fused decode-matmul (window code) on a GPU: correctness against the numpy
definition, then its speed beside cuBLAS bf16 ``F.linear`` and a copy of the compressed bytes.

    python tools/bench_fused_gpu.py [--shapes 8b] [--batches 1,4,16] [--reps 50]

Per shape (Llama-3-8B: q/o 4096->4096, gate/up 4096->14336, down 14336->4096; SmolLM2's head
576->49152) and batch: first the fused output for fresh x is compared bit for bit with
``fused_reference.linear`` (on the CPU; any difference is printed and the exit status is 1:
e.g. an FMA the launch did not forbid); then median times over ``--reps`` calls (CUDA events) of
  fused   ``triton.fused.FusedWeightW4(ct, "cuda").linear(x)`` (W in the window code);
  plain   ``F.linear(x, W)`` on the dense bf16 W (cuBLAS);
  copy    a device ``copy_`` of the compressed bytes (the roofline of any kernel reading them once).
``plain/fused`` > 1: the fused kernel is faster than plain (the issue's goal: >= 1.2x at batch 1
on an 8B shape). W: bf16 N(0, 0.02) (a trained layer's exponent statistics).
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F

from nzrt import codec
from nzrt.kernels import fused_reference
from nzrt.kernels.triton import fused as triton_fused

SHAPES = {"8b": [("8b q/o", 4096, 4096), ("8b gate/up", 4096, 14336), ("8b down", 14336, 4096)],
          "smol": [("smol head", 576, 49152)], "tiny": [("tiny", 128, 96)]}


def _time(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    return statistics.median(ts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="8b,smol")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_fused_gpu: no CUDA device", file=sys.stderr)
        return 2
    gen = torch.Generator().manual_seed(0)
    print(f"# {torch.cuda.get_device_name()}; torch {torch.__version__}")
    hdr = (f"{'shape':<11} {'K->N':>12} {'rows':>4} {'bits/w':>6} | {'exact':>5} | {'fused us':>9} {'GB/s':>7} | "
           f"{'plain us':>9} {'GB/s':>7} | {'copy us':>8} {'GB/s':>7} | {'plain/fused':>11}")
    print(hdr)
    print("-" * len(hdr))
    bad = 0
    for group in args.shapes.split(","):
        for label, K, N in SHAPES[group]:
            w = (torch.randn(N, K, generator=gen) * 0.02).bfloat16()
            ct = codec.compress(w, widths=codec.WINDOW4)
            fw = triton_fused.FusedWeightW4(ct, "cuda")
            wd = w.cuda()
            cb = ct.data.numel()
            src = ct.data.cuda()
            dst = torch.empty_like(src)
            t_copy = _time(lambda: dst.copy_(src), args.reps)
            for rows in (int(b) for b in args.batches.split(",")):
                x = torch.randn(rows, K, generator=gen).bfloat16()
                xd = x.cuda()
                got = fw.linear(xd).cpu()
                want = fused_reference.linear(ct, x) if N * K <= (1 << 25) else None
                ok = "-" if want is None else ("yes" if torch.equal(got.view(torch.int16), want.view(torch.int16)) else "NO")
                bad += ok == "NO"
                t_f = _time(lambda: fw.linear(xd), args.reps)
                t_p = _time(lambda: F.linear(xd, wd), args.reps)
                print(f"{label:<11} {f'{K}->{N}':>12} {rows:>4} {8 * cb / (N * K):>6.2f} | {ok:>5} | "
                      f"{t_f * 1e6:>9.1f} {cb / t_f / 1e9:>7.1f} | {t_p * 1e6:>9.1f} {2 * N * K / t_p / 1e9:>7.1f} | "
                      f"{t_copy * 1e6:>8.1f} {cb / t_copy / 1e9:>7.1f} | {t_p / t_f:>10.2f}x", flush=True)
    print("# GB/s: fused and copy = compressed bytes / time, plain = dense bf16 bytes / time; exact: fused "
          "output bits == fused_reference.linear's ('-': not checked at this size, the reference is numpy)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
