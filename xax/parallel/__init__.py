"""Parallel plans on JAX's SPMD: a (data, fsdp, tensor) mesh, logical-axis sharding rules, validation
before compiling, and a report of memory and FLOPs per device."""

from xax.parallel.errors import BatchSizeError as BatchSizeError
from xax.parallel.errors import MeshShapeError as MeshShapeError
from xax.parallel.errors import PlanError as PlanError
from xax.parallel.errors import ShardingError as ShardingError
from xax.parallel.mesh import AXES as AXES
from xax.parallel.mesh import BATCH_AXES as BATCH_AXES
from xax.parallel.mesh import axis_sizes as axis_sizes
from xax.parallel.mesh import batch_axis_size as batch_axis_size
from xax.parallel.mesh import make_mesh as make_mesh
from xax.parallel.plan import ParallelOptions as ParallelOptions
from xax.parallel.plan import Plan as Plan
from xax.parallel.plan import batch_spec as batch_spec
from xax.parallel.plan import check_batch_size as check_batch_size
from xax.parallel.plan import gathered_shardings as gathered_shardings
from xax.parallel.plan import gathered_spec as gathered_spec
from xax.parallel.plan import mirror_specs as mirror_specs
from xax.parallel.plan import named as named
from xax.parallel.plan import param_spec as param_spec
from xax.parallel.plan import param_specs as param_specs
from xax.parallel.plan import plan_axis_sizes as plan_axis_sizes
from xax.parallel.plan import shard_bytes as shard_bytes
from xax.parallel.report import CompiledStats as CompiledStats
from xax.parallel.report import PlanReport as PlanReport
from xax.parallel.report import compiled_stats as compiled_stats
from xax.parallel.report import make_report as make_report
from xax.parallel.rules import LOGICAL_AXES as LOGICAL_AXES
from xax.parallel.rules import Rules as Rules
from xax.parallel.rules import compile_rules as compile_rules
from xax.parallel.rules import logical_axes as logical_axes
from xax.parallel.rules import model_rules as model_rules
