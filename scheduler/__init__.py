"""Mechanism (installed as ``nzrt.scheduler``): execution trace, slot pool of dense buffers,
prefetch to a CPU worker thread or a CUDA side stream."""
if __name__ == "scheduler":  # the project root is on sys.path: `import scheduler` means the installed package
    import os as _os, runpy as _runpy  # nzrt/_step_aside.py by path: importing nzrt here could recurse
    _runpy.run_path(_os.path.join(_os.path.dirname(_os.path.dirname(__file__)), "nzrt", "_step_aside.py"))[
        "step_aside"](__name__, __file__)
else:
    from .engine import FOLLOW, ONDEMAND, RECORD, Scheduler, TensorSlot, UnitStats
    from .pool import SlotPool
    from .trace import TraceRecorder
    from .worker import CpuWorker, Job

    __all__ = ["Scheduler", "TensorSlot", "UnitStats", "CpuWorker", "Job", "SlotPool", "TraceRecorder",
               "RECORD", "FOLLOW", "ONDEMAND"]
