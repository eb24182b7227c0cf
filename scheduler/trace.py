"""TraceRecorder: the order in which units run during one forward pass."""
from __future__ import annotations

import time


class TraceRecorder:
    """Records unit names and their compute times during one pass."""

    def __init__(self):
        self.units: list = []
        self.seconds: dict = {}
        self._open: list = []
        self.active = False

    def start(self) -> None:
        self.units = []
        self.seconds = {}
        self._open = []
        self.active = True

    def enter(self, unit: str) -> None:
        if self.active:
            self.units.append(unit)
            self._open.append((unit, time.perf_counter()))

    def exit(self, unit: str) -> None:
        if self.active and self._open and self._open[-1][0] == unit:
            u, t0 = self._open.pop()
            self.seconds[u] = self.seconds.get(u, 0.0) + time.perf_counter() - t0

    def finish(self) -> tuple:
        self.active = False
        counts: dict = {}
        for u in self.units:
            counts[u] = counts.get(u, 0) + 1
        per_run = {u: s / counts[u] for u, s in self.seconds.items()}
        self.seconds = per_run
        return tuple(self.units)
