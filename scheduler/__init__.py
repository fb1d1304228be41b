"""Pure scheduling policies (no torch): inter-stage, intra-stage, plan search."""

# inter-stage fusion (RLHFuse §4): migration rule, policies, generation simulator
from .gen_cost import GenCostModel
from .gen_sim import GenSimResult, simulate as simulate_generation
from .interstage import (InterStagePolicy, MigrationPlan, available_policies,
                         get_policy, plan_migration, register_policy)
