"""Pure placement and prefetch decisions (installed as ``nzrt.policies``). No torch, no CUDA."""
from .core import POLICIES, Auto, Belady, Lru, Offload, Resident, get_policy
from .plan import (BudgetError, Costs, LayerInfo, Plan, PlanError, SimResult, Step, Tier,
                   estimate_seconds, simulate, static_bytes)

__all__ = ["Auto", "Belady", "Lru", "Offload", "Resident", "get_policy", "POLICIES", "BudgetError",
           "Costs", "LayerInfo", "Plan", "PlanError", "SimResult", "Step", "Tier", "estimate_seconds",
           "simulate", "static_bytes"]
