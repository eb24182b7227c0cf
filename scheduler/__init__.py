"""Mechanism (installed as ``nzrt.scheduler``): execution trace, slot pool of dense buffers,
prefetch to a CPU worker thread or a CUDA side stream."""
from .engine import FOLLOW, ONDEMAND, RECORD, CpuWorker, Scheduler, TensorSlot, UnitStats
from .pool import SlotPool
from .trace import TraceRecorder

__all__ = ["Scheduler", "TensorSlot", "UnitStats", "CpuWorker", "SlotPool", "TraceRecorder",
           "RECORD", "FOLLOW", "ONDEMAND"]
