"""A large ``nn.Embedding`` in row chunks: a lookup decodes only the chunks its ids hit.

Exact whatever the split: a lookup copies rows. Which chunks a batch hits depends on the data,
so these units stay out of the trace and are decoded on demand.

With autograd on and the weight trainable, the lookup is an autograd Function whose backward is
``aten::embedding_backward``, the very formula PyTorch's ``F.embedding`` uses: the gradient is
plain's, bit for bit, and reaches the parameter (and its optimizer-step hook) as usual.
"""
from __future__ import annotations

import torch



def chunked_embedding_forward(shared, mp, chunk_units):
    """The forward of a plain ``nn.Embedding`` whose weight is in row chunks.
    ``chunk_units``: [(unit, key, (first row, end row))] in row order."""
    lookup = row_lookup(shared, mp, chunk_units)
    module = next(m for m, _ in mp.owners if isinstance(m, torch.nn.Embedding))

    def forward(input):
        if torch.is_grad_enabled() and mp.param.requires_grad:
            return _Lookup.apply(input, mp.param, lookup, module)
        return lookup(input)
    return forward


def row_lookup(shared, mp, chunk_units):
    """``ids -> weight[ids]`` (no autograd). On the CPU with the numba codec only the tiles that
    hold the ids' rows are decoded, straight from each chunk's compressed bytes
    (``FusedWeight.rows``: no dense chunk at all); elsewhere the chunks the ids fall in are decoded."""
    num, dim = mp.shape
    rows_per_chunk = chunk_units[0][2][1]
    lock = shared.lock
    tiles = shared.decoder.tiles_on_cpu

    def lookup(input):
        with lock:
            s = shared.scheduler
            flat = input.reshape(-1)  # ids: int[n]
            if flat.numel() and (bool((flat < 0).any()) or bool((flat >= num).any())):
                raise IndexError("index out of range in self")
            out = torch.empty((flat.numel(), dim), dtype=mp.dtype, device=flat.device)
            chunk_of = torch.div(flat, rows_per_chunk, rounding_mode="floor")
            hit = torch.unique(chunk_of).tolist() if flat.numel() else []
            for c in hit:
                unit, key, (a, b) = chunk_units[c]
                sel = (chunk_of == c).nonzero().squeeze(1)
                if tiles and flat.device.type == "cpu":
                    fw = shared.fused_weight(key)
                    out.index_copy_(0, sel, fw.rows(flat.index_select(0, sel) - a))
                    shared.decoder.after_read(fw.ct)
                    continue
                bufs = s.enter(unit, traced=False)
                try:
                    w = bufs[key].view(b - a, dim)
                    out.index_copy_(0, sel, w.index_select(0, flat.index_select(0, sel) - a))
                finally:
                    s.exit(unit)
            return out.view(*input.shape, dim)
    return lookup


class _Lookup(torch.autograd.Function):
    """rows = weight[ids], the rows gathered from the decoded chunks; d weight as plain's."""

    @staticmethod
    def forward(ctx, ids, weight, lookup, module):
        ctx.save_for_backward(ids)
        ctx.num = weight.shape[0]
        ctx.padding_idx = -1 if module.padding_idx is None else module.padding_idx
        ctx.scale, ctx.sparse = module.scale_grad_by_freq, module.sparse
        return lookup(ids)

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        dw = torch.ops.aten.embedding_backward(grad, ids, ctx.num, ctx.padding_idx, ctx.scale, ctx.sparse)
        return None, dw, None, None
