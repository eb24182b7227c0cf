"""A large ``nn.Embedding`` in row chunks: a lookup decodes only the chunks its ids hit.

Exact whatever the split: a lookup copies rows. Which chunks a batch hits depends on the data,
so these units stay out of the trace and are decoded on demand.
"""
from __future__ import annotations

import torch


def chunked_embedding_forward(run, mp, chunk_units):
    """``chunk_units``: [(unit, key, (first row, end row))] in row order."""
    num, dim = mp.shape
    rows_per_chunk = chunk_units[0][2][1]
    lock = run.lock

    def forward(input):
        with lock:
            if torch.is_grad_enabled():
                run.no_grad_check([(mp, None)], (input,))
            s = run.scheduler
            flat = input.reshape(-1)  # ids: int[n]
            if flat.numel() and (bool((flat < 0).any()) or bool((flat >= num).any())):
                raise IndexError("index out of range in self")
            out = torch.empty((flat.numel(), dim), dtype=mp.dtype, device=flat.device)
            chunk_of = torch.div(flat, rows_per_chunk, rounding_mode="floor")
            hit = torch.unique(chunk_of).tolist() if flat.numel() else []
            for c in hit:
                unit, key, (a, b) = chunk_units[c]
                bufs = s.enter(unit, traced=False)
                try:
                    sel = (chunk_of == c).nonzero().squeeze(1)
                    w = bufs[key].view(b - a, dim)
                    out.index_copy_(0, sel, w.index_select(0, flat.index_select(0, sel) - a))
                finally:
                    s.exit(unit)
            return out.view(*input.shape, dim)
    return forward
