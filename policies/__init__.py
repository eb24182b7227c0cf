"""Pure placement and prefetch decisions (installed as ``nzrt.policies``). No torch, no CUDA."""
if __name__ == "policies":  # the project root is on sys.path: `import policies` means the installed package
    import os as _os, runpy as _runpy  # nzrt/_step_aside.py by path: importing nzrt here could recurse
    _runpy.run_path(_os.path.join(_os.path.dirname(_os.path.dirname(__file__)), "nzrt", "_step_aside.py"))[
        "step_aside"](__name__, __file__)
else:
    from .core import (ALIASES, POLICIES, Auto, Belady, Fused, Lru, Offload, Resident, entry_need, fallback_need,
                       fallback_plan, get_policy, on_demand_fallbacks, smallest_budget_for)
    from .plan import (BudgetError, Costs, LayerInfo, Plan, PlanError, SimResult, Step, Tier,
                       estimate_seconds, simulate, static_bytes)

    __all__ = ["Auto", "Belady", "Fused", "Lru", "Offload", "Resident", "get_policy", "POLICIES", "ALIASES", "BudgetError",
               "entry_need", "fallback_need", "fallback_plan", "on_demand_fallbacks", "smallest_budget_for",
               "Costs", "LayerInfo", "Plan", "PlanError", "SimResult", "Step", "Tier", "estimate_seconds",
               "simulate", "static_bytes"]
