"""Pure placement and prefetch decisions (installed as ``nzrt.policies``). No torch, no CUDA."""
from .core import (ALIASES, POLICIES, Auto, Belady, Fused, Lru, Offload, Resident, entry_need, fallback_need,
                   fallback_plan, get_policy, on_demand_fallbacks, smallest_budget_for)
from .plan import (BudgetError, Costs, LayerInfo, Plan, PlanError, SimResult, Step, Tier,
                   estimate_seconds, simulate, static_bytes)

__all__ = ["Auto", "Belady", "Fused", "Lru", "Offload", "Resident", "get_policy", "POLICIES", "ALIASES", "BudgetError",
           "entry_need", "fallback_need", "fallback_plan", "on_demand_fallbacks", "smallest_budget_for",
           "Costs", "LayerInfo", "Plan", "PlanError", "SimResult", "Step", "Tier", "estimate_seconds",
           "simulate", "static_bytes"]
