"""Pure scheduling policies (no torch): inter-stage, intra-stage, plan search."""

# inter-stage fusion (RLHFuse §4): migration rule, policies, generation simulator
from .gen_cost import GenCostModel
from .gen_sim import GenSimResult, simulate as simulate_generation
from .interstage import (InterStagePolicy, MigrationPlan, available_policies,
                         get_policy, plan_migration, register_policy)
# partial rollouts (issue 18): registers the ``partial`` policy beside interstage's own
from .partial import CarriedSample, PartialRolloutPolicy, is_partial

# execution plans (ReaLHF placement search, Xiao et al. strategies)
from .plan import CALLS, CallPlan, ExecutionPlan, Fusion, PlanError, Realloc
from .plan_search import (NoFittingPlan, Score, SearchResult, SearchSpace, brute_force,
                          search as search_plan)

# intra-stage fusion (RLHFuse §5): fused actor/critic pipeline schedules
from .pipeline_bounds import LowerBound, lower_bound
from .pipeline_problem import FusedProblem, PipelineSpec, Schedule, TaskTable


def solve_fused_schedule(*args, **kwargs):
    """:func:`fusedrl.scheduler.pipeline_schedule.solve`, imported on first use
    (it loads the numba kernels of ``fusedrl.kernels.schedule_eval``)."""
    from .pipeline_schedule import solve

    return solve(*args, **kwargs)
