"""Mechanism (installed as ``nzrt.scheduler``): execution trace, slot pool of dense buffers,
prefetch to a CPU worker thread or a CUDA side stream."""
import os as _os

if __name__ == "scheduler":  # the project root is on sys.path: `import scheduler` means the installed package
    import importlib.util as _u
    _s = _u.spec_from_file_location(
        "_nzrt_step_aside", _os.path.join(_os.path.dirname(_os.path.dirname(__file__)), "nzrt", "_step_aside.py"))
    _m = _u.module_from_spec(_s)
    _s.loader.exec_module(_m)
    _m.step_aside(__name__, __file__)
else:
    from .engine import FOLLOW, ONDEMAND, RECORD, CpuWorker, Scheduler, TensorSlot, UnitStats
    from .pool import SlotPool
    from .trace import TraceRecorder

    __all__ = ["Scheduler", "TensorSlot", "UnitStats", "CpuWorker", "SlotPool", "TraceRecorder",
               "RECORD", "FOLLOW", "ONDEMAND"]
