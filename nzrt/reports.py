"""Report: what a managed run did, per layer and in total. ``str(report)`` is a readable table,
``report.to_json()`` the same as JSON."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from .budget import format_bytes


@dataclass
class LayerReport:
    name: str
    tier: str
    dense_bytes: int
    compressed_bytes: int
    decodes: int = 0
    decode_s: float = 0.0
    transfer_s: float = 0.0
    stall_s: float = 0.0
    hits: int = 0
    misses: int = 0
    runs: int = 0


@dataclass
class Report:
    policy: str
    device: str
    plan: str
    budget: int | None
    mantissa_bits: int | None
    layers: list = field(default_factory=list)
    held: dict = field(default_factory=dict)       # bytes held now, measured from storages
    peaks: dict = field(default_factory=dict)      # MemoryTracker peaks (host RSS, torch, NVML)
    nvml: str = ""
    runtime_peak_dense: int = 0                    # peak bytes of dense buffers held by the scheduler
    pool_allocations: int = 0
    passes: int = 0
    divergences: int = 0
    replans: int = 0
    mode: str = ""
    entry_s: float = 0.0
    warnings: list = field(default_factory=list)
    fixed_bytes: int = 0
    weights_dense_bytes: int = 0         # every managed tensor once (tied weights once)
    weights_compressed_bytes: int = 0
    training: str = ""                   # optimizers and their states (optimizer=...)
    sharded: str = ""                    # FSDP2: local shards compressed, bytes all-gathered (runtime/fsdp.py)
    fused: str = ""                      # fused passes (policies.Fused)
    blocked: str = ""                    # heads in row chunks and how their calls ran (runtime/blocked.py)

    # -- totals -------------------------------------------------------------------------------
    @property
    def dense_bytes(self) -> int:
        return self.weights_dense_bytes or sum(layer.dense_bytes for layer in self.layers)

    @property
    def compressed_bytes(self) -> int:
        return self.weights_compressed_bytes or sum(layer.compressed_bytes for layer in self.layers)

    @property
    def ratio(self) -> float:
        return self.compressed_bytes / max(self.dense_bytes, 1)

    def totals(self) -> dict:
        ls = self.layers
        return {
            "layers": len(ls), "dense_bytes": self.dense_bytes, "compressed_bytes": self.compressed_bytes,
            "ratio": self.ratio, "decodes": sum(x.decodes for x in ls),
            "decode_s": sum(x.decode_s for x in ls), "transfer_s": sum(x.transfer_s for x in ls),
            "stall_s": sum(x.stall_s for x in ls), "hits": sum(x.hits for x in ls),
            "misses": sum(x.misses for x in ls),
        }

    def to_dict(self) -> dict:
        d = asdict(self)
        d["totals"] = self.totals()
        return d

    def to_json(self, **kw) -> str:
        kw.setdefault("indent", 2)
        return json.dumps(self.to_dict(), **kw)

    def _head(self) -> list:
        return [f"nzrt report - policy {self.policy} on {self.device}"
                + (f", mantissa_bits={self.mantissa_bits}" if self.mantissa_bits is not None else ", lossless"),
                f"  plan: {self.plan or '-'}"]

    def summary(self) -> str:
        """A few lines: policy, plan, compressed vs dense bytes, bytes held, decodes, stalls, peaks
        (``str(report)`` adds a line per layer)."""
        t = self.totals()
        h = self.held or {}
        if self.sharded and not t["layers"]:  # FSDP2: every managed weight is a compressed shard
            return "\n".join(self._head()[:1] + self._extras() + self._peaks() + self._warnings())
        lines = self._head() + [
            f"  weights {format_bytes(t['dense_bytes'])} dense -> {format_bytes(t['compressed_bytes'])} compressed "
            f"({100 * t['ratio']:.1f}%) in {t['layers']} layers; {format_bytes(self.fixed_bytes)} left "
            f"uncompressed; budget {format_bytes(self.budget)}",
        ]
        if h:
            comp = {k: h.get(f"compressed_{k}", 0) for k in ("device", "host", "mapped")}
            where = ", ".join(f"{k} {format_bytes(v)}" for k, v in comp.items() if v)
            lines.append(f"  held: compressed {format_bytes(sum(comp.values()))}" + (f" ({where})" if where else "")
                         + f", dense slots {format_bytes(h.get('dense_slots', 0))} "
                         f"(peak {format_bytes(self.runtime_peak_dense)}), uncompressed "
                         f"{format_bytes(h.get('uncompressed', 0))}"
                         + (f", restore copies on disk {format_bytes(h['restore_copies_on_disk'])}"
                            if h.get("restore_copies_on_disk") else ""))
        else:
            lines.append(f"  dense slot peak {format_bytes(self.runtime_peak_dense)}")
        lines.append(f"  decodes {t['decodes']} ({t['decode_s'] * 1e3:.1f} ms), transfer {t['transfer_s'] * 1e3:.1f} ms, "
                     f"stalls {t['stall_s'] * 1e3:.1f} ms; hits {t['hits']}, on-demand {t['misses']}; "
                     f"passes {self.passes}, re-plans {self.replans}")
        return "\n".join(lines + self._peaks() + self._extras() + self._warnings())

    def _peaks(self) -> list:
        p = self.peaks or {}
        peaks = [f"host RSS {format_bytes(p['host_rss'])}"] if p.get("host_rss") is not None else []
        dev = p.get("nvml_used", p.get("torch_max_allocated"))
        if dev is not None:
            peaks.append(f"device {format_bytes(dev)} ({'NVML' if 'nvml_used' in p else 'torch'})")
        return ["  peaks (sampled): " + ", ".join(peaks)] if peaks else []

    def _extras(self) -> list:
        """The lines of the parts a block may have: training, FSDP2, fused passes, blocked heads."""
        return [f"  {line}" for line in (self.training, self.sharded, self.fused, self.blocked) if line]

    def _warnings(self) -> list:
        return [f"  warning: {w}" for w in self.warnings]

    def layer_lines(self) -> list:
        """One line per layer (with a header line)."""
        lines = [f"  {'layer':<40} {'tier':<7} {'dense':>11} {'compr':>11} {'dec':>5} {'dec ms':>8} "
                 f"{'stall ms':>8} {'hits':>5} {'miss':>5}"]
        for x in self.layers:
            name = x.name if len(x.name) <= 40 else "..." + x.name[-37:]
            lines.append(f"  {name:<40} {x.tier:<7} {format_bytes(x.dense_bytes):>11} "
                         f"{format_bytes(x.compressed_bytes):>11} {x.decodes:>5} {x.decode_s * 1e3:>8.2f} "
                         f"{x.stall_s * 1e3:>8.2f} {x.hits:>5} {x.misses:>5}")
        return lines

    def __str__(self) -> str:
        t = self.totals()
        if self.sharded and not t["layers"]:  # FSDP2: no layers of nzrt's own scheduler to list
            return self.summary()
        lines = self._head() + [
            f"  budget {format_bytes(self.budget)}; weights {format_bytes(t['dense_bytes'])} dense -> "
            f"{format_bytes(t['compressed_bytes'])} compressed ({100 * t['ratio']:.1f}%); "
            f"{format_bytes(self.fixed_bytes)} left uncompressed",
            f"  passes {self.passes}, re-plans {self.replans}, trace changes {self.divergences}, mode {self.mode}",
            f"  decodes {t['decodes']} ({t['decode_s'] * 1e3:.1f} ms), transfer {t['transfer_s'] * 1e3:.1f} ms, "
            f"stalls {t['stall_s'] * 1e3:.1f} ms, hits {t['hits']}, on-demand {t['misses']}",
            f"  dense slot peak {format_bytes(self.runtime_peak_dense)}, slot allocations {self.pool_allocations}",
        ]
        if self.held:
            lines.append("  held now: " + ", ".join(f"{k} {format_bytes(v)}" for k, v in self.held.items()))
        if self.peaks:
            lines.append("  peaks: " + ", ".join(f"{k} {format_bytes(v)}" for k, v in sorted(self.peaks.items())))
        lines.append(f"  NVML: {self.nvml}")
        lines += self._extras() + self._warnings() + [""]
        lines.extend(self.layer_lines())
        return "\n".join(lines)
