"""Per-tensor statistics for ``nzrt inspect``: dtype, shape, bits/weight, exponent entropy and how
many weights each level (tier) of the exponent cascade resolves; totals over the model."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..loading.entries import INTERNAL_PREFIX


def exponent_histogram(dense) -> np.ndarray:
    """Histogram of the raw exponent field of a float tensor (length 2**exp_bits)."""
    import torch

    from ..codec import int_dtype, layout_of

    lay = layout_of(dense.dtype)
    bits = dense.detach().cpu().contiguous().reshape(-1).view(int_dtype(lay)).numpy().view(lay.uint)
    exp = (bits >> lay.man_bits) & lay.exp_mask
    return np.bincount(exp.astype(np.int64), minlength=1 << lay.exp_bits)


def entropy_bits(hist: np.ndarray) -> float:
    n = hist.sum()
    if n == 0:
        return 0.0
    p = hist[hist > 0] / n
    return float(-(p * np.log2(p)).sum())


def level_coverage(hist: np.ndarray, header) -> list[float]:
    """Fraction of the weights whose exponent each level of the cascade names (raw level last)."""
    n = max(int(hist.sum()), 1)
    out, start = [], 0
    for w in header.widths:
        cap = (1 << w) - 1
        syms = list(header.symbols[start:start + cap])
        out.append(float(hist[syms].sum()) / n if syms else 0.0)
        start += cap
    if header.has_raw:
        out.append(max(0.0, 1.0 - sum(out)))
    return out


def code_name(header) -> str:
    """The exponent code of a compressed tensor: "window" (``codec.WINDOW4``, one 4-bit level: what
    ``nzrt compress --fused`` writes, the fused CPU kernel's fast code) or "cascade" (the
    planner's levels, the smallest)."""
    from ..kernels.spec import WINDOW4

    return "window" if tuple(header.widths) == WINDOW4 else "cascade"


def tensor_row(name: str, value, dense=None) -> dict:
    """Stats of one entry: a CompressedTensor (decoded here to measure) or a dense tensor."""
    import torch

    from .. import codec

    if isinstance(value, torch.Tensor):
        row = {"name": name, "dtype": str(value.dtype).removeprefix("torch."), "shape": list(value.shape),
               "numel": value.numel(), "compressed": False, "nbytes": value.numel() * value.element_size(),
               "dense_nbytes": value.numel() * value.element_size(),
               "bits_per_weight": 8.0 * value.element_size()}
        if value.is_floating_point() and value.dtype in (torch.bfloat16, torch.float16, torch.float32):
            hist = exponent_histogram(value)
            row.update(exponent_entropy=entropy_bits(hist), exponent_histogram=_sparse(hist))
        return row
    h = value.header
    if dense is None:
        dense = codec.decompress(value)
    hist = exponent_histogram(dense)
    itemsize = h.layout.itemsize
    return {"name": name, "dtype": h.dtype, "shape": list(h.shape), "numel": h.numel, "compressed": True,
            "mantissa_bits": h.mantissa_bits, "lossless": h.lossless, "nbytes": value.nbytes, "code": code_name(h),
            "dense_nbytes": h.numel * itemsize, "bits_per_weight": value.bits_per_weight,
            "exponent_entropy": entropy_bits(hist), "levels": list(h.widths) + ([h.layout.exp_bits] if h.has_raw else []),
            "coverage": level_coverage(hist, h), "exponent_histogram": _sparse(hist)}


def _sparse(hist: np.ndarray) -> dict:
    return {str(int(i)): int(hist[i]) for i in np.flatnonzero(hist)}


def totals(rows: list[dict]) -> dict:
    comp = [r for r in rows if r["compressed"]]
    n = sum(r["numel"] for r in rows)
    nc = sum(r["numel"] for r in comp)
    cov: list[float] = []
    for r in comp:
        for i, c in enumerate(r["coverage"]):
            if i >= len(cov):
                cov.append(0.0)
            cov[i] += c * r["numel"]
    return {"tensors": len(rows), "compressed_tensors": len(comp), "numel": n,
            "nbytes": sum(r["nbytes"] for r in rows), "dense_nbytes": sum(r["dense_nbytes"] for r in rows),
            "bits_per_weight": 8.0 * sum(r["nbytes"] for r in comp) / max(nc, 1),
            "exponent_entropy": sum(r["exponent_entropy"] * r["numel"] for r in comp) / max(nc, 1),
            "coverage_by_level_index": [c / max(nc, 1) for c in cov],
            "codes": {c: sum(r.get("code") == c for r in comp) for c in ("cascade", "window")},
            "ratio": sum(r["nbytes"] for r in rows) / max(sum(r["dense_nbytes"] for r in rows), 1)}


def inspect_file(path, progress=None) -> dict:
    """Stats of every tensor of a ``.nzrt`` file (each decoded once, one at a time)."""
    from ..format.checkpoint import load, load_metadata

    path = Path(path)
    meta = load_metadata(path)
    tensors = load(path)
    names = [k for k in tensors if not k.startswith(INTERNAL_PREFIX)]
    total = sum(tensors[k].numel() for k in names)
    rows, done = [], 0
    for k in names:
        rows.append(tensor_row(k, tensors[k]))
        done += tensors[k].numel()
        if progress:
            progress(done, total, k)
    return {"source": str(path), "file_bytes": path.stat().st_size, "metadata": _brief_meta(meta),
            "tensors": rows, "totals": totals(rows)}


def _brief_meta(meta: dict) -> dict:
    info = dict(meta.get("nzrt_model") or {})
    info.pop("config", None)
    return info


def inspect_model(lm, *, mantissa_bits: int | None = None, progress=None) -> dict:
    """Stats of a loaded model's parameters as nzrt would compress them (tied weights once)."""
    import torch

    from .. import codec

    if lm.compressed is not None:
        rows = []
        params = list(lm.model.named_parameters())
        total = sum(p.numel() for _, p in params)
        done = 0
        for name, p in params:
            rows.append(tensor_row(name, lm.compressed[name]))
            done += p.numel()
            if progress:
                progress(done, total, name)
        return {"source": lm.source, "tensors": rows, "totals": totals(rows)}
    params = list(lm.model.named_parameters())
    total = sum(p.numel() for _, p in params)
    rows, done = [], 0
    for name, p in params:
        t = p.detach().cpu()
        if t.is_floating_point():
            ct = codec.compress(t, mantissa_bits=mantissa_bits)
            dense = t if ct.header.lossless else None
            rows.append(tensor_row(name, ct, dense=dense))
        else:
            rows.append(tensor_row(name, t))
        done += p.numel()
        if progress:
            progress(done, total, name)
    return {"source": lm.source, "tensors": rows, "totals": totals(rows)}


def format_table(result: dict, *, limit: int | None = None) -> str:
    """A readable table of ``inspect_file``/``inspect_model``'s result."""
    rows = result["tensors"]
    lines = [f"{'tensor':<48} {'dtype':<9} {'shape':<16} {'bits/w':>7} {'H(exp)':>7}  tiers (cumulative %)"]
    shown = rows if limit is None else rows[:limit]
    for r in shown:
        shape = "x".join(str(s) for s in r["shape"]) or "scalar"
        ent = f"{r['exponent_entropy']:.2f}" if "exponent_entropy" in r else "-"
        if r["compressed"]:
            cum, acc = [], 0.0
            for c in r["coverage"]:
                acc += c
                cum.append(f"{100 * acc:.1f}")
            tiers = "/".join(cum) + ("" if r["lossless"] else f"  (lossy, {r['mantissa_bits']} mantissa bits)")
            tiers += "  window code" if r.get("code") == "window" else ""
        else:
            tiers = "dense"
        name = r["name"] if len(r["name"]) <= 48 else "…" + r["name"][-47:]
        lines.append(f"{name:<48} {r['dtype']:<9} {shape:<16} {r['bits_per_weight']:>7.2f} {ent:>7}  {tiers}")
    if limit is not None and len(rows) > limit:
        lines.append(f"... {len(rows) - limit} more tensors (--all shows them, --json writes all)")
    t = result["totals"]
    cov, acc = [], 0.0
    for c in t["coverage_by_level_index"]:
        acc += c
        cov.append(f"{100 * acc:.1f}")
    lines.append("")
    lines.append(f"total: {t['tensors']} tensors ({t['compressed_tensors']} compressed), {t['numel']:,} weights, "
                 f"{_mb(t['dense_nbytes'])} dense -> {_mb(t['nbytes'])} ({100 * t['ratio']:.1f}%)")
    lines.append(f"       {t['bits_per_weight']:.2f} bits/weight compressed, exponent entropy "
                 f"{t['exponent_entropy']:.2f} bits, tier coverage (cumulative %) {'/'.join(cov)}")
    codes = t.get("codes") or {}
    if codes.get("window"):
        lines.append(f"       exponent code: {codes['window']} tensors in the window code (the fused "
                     f"kernel's fast code, `nzrt compress --fused`), {codes.get('cascade', 0)} in the cascade")
    if "file_bytes" in result:
        lines.append(f"       file {_mb(result['file_bytes'])}")
    return "\n".join(lines)


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
