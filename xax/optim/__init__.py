"""Optimizers and learning-rate schedules by name (the ``optim`` config group), usable without a Task."""

from xax.optim.optimizers import decay_mask as decay_mask
from xax.optim.optimizers import make_optimizer as make_optimizer
from xax.optim.options import OPTIMIZERS as OPTIMIZERS
from xax.optim.options import OptimOptions as OptimOptions
from xax.optim.options import check_options as check_options
from xax.optim.schedules import SCHEDULES as SCHEDULES
from xax.optim.schedules import make_schedule as make_schedule
