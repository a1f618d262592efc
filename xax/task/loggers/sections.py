"""Where a scalar goes on a dashboard: the task's metrics at the top, the framework's own grouped.

The training loop logs, beside the task's metrics, its throughput (``steps_per_second``,
``samples_per_second``, ``mfu``, the ``timers/*`` of each section), the host and devices
(``cpu/*``, ``gpu/*``, ``peak_memory_gb``, ``epoch``) and a few values fixed for the run
(``flops_per_step``, ``time_to_first_step_s``). Flat, they would make a dozen top-level sections
of a dashboard; ``dashboard_tag`` puts them under ``perf/`` and ``system/``.

Examples:
    >>> dashboard_tag("loss"), dashboard_tag("samples_per_second"), dashboard_tag("gpu/0/power_w")
    ('loss', 'perf/samples_per_second', 'system/gpu/0/power_w')
"""

# Values fixed for a run (or for one compilation of the step): logged when they change.
CONSTANT_NAMES = frozenset({"flops_per_step", "time_to_first_step_s"})

_PERF_NAMES = frozenset({"mfu", "data_wait_fraction", *CONSTANT_NAMES})
_PERF_PREFIXES = ("timers/",)
_SYSTEM_NAMES = frozenset({"peak_memory_gb", "epoch"})
_SYSTEM_PREFIXES = ("cpu/", "gpu/")


def dashboard_tag(name: str) -> str:
    """The tag of a logged scalar on a dashboard.

    Args:
        name: The scalar's name as logged (and as written to ``log.jsonl``).

    Returns:
        ``perf/<name>`` for throughput and time (rates per second, MFU, data wait, section timers,
        FLOPs per step, time to the first step), ``system/<name>`` for the host and devices (CPU,
        GPU, peak memory, epoch), else the name itself.
    """
    if name in _PERF_NAMES or name.endswith("_per_second") or name.startswith(_PERF_PREFIXES):
        return f"perf/{name}"
    if name in _SYSTEM_NAMES or name.startswith(_SYSTEM_PREFIXES):
        return f"system/{name}"
    return name
