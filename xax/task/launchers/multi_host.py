"""Several processes, usually one per host, joined by ``jax.distributed`` into one global mesh.

Every process runs the same program. The settings come from ``launcher.distributed`` or, for the
ones left unset, from the SLURM job step the process was started in by ``srun``. Process 0 hosts
the coordinator the others connect to, listening only where they reach it (see
``coordinator_bind_address``); after that the mesh spans every process's devices, each
process feeds its own rows of every batch, and only process 0 writes logs and run metadata.
"""

import ipaddress
import logging
import re
import socket
import time
from dataclasses import dataclass

import jax
from jax._src import xla_bridge
from typing_extensions import override

from xax.core.config import field
from xax.core.errors import LaunchError
from xax.task.launchers.base import Launcher, Placement
from xax.utils.env import SlurmStep, slurm_job_id, slurm_step

logger = logging.getLogger(__name__)

_KEY = "launcher.distributed"
_CONNECT_POLL_S = 0.5
_ADDRESS = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[^:\s]+):(?P<port>\d{1,5})")


@dataclass
class DistributedOptions:
    coordinator_address: str | None = field(
        None, help="multi_host: HOST:PORT where process 0 serves the coordinator (None: the job step's first node)"
    )
    num_processes: int | None = field(None, help="multi_host: processes in the run (None: the job step's tasks)")
    process_id: int | None = field(None, help="multi_host: this process's rank, 0 to num_processes - 1 (None: SLURM's)")
    local_device_ids: list[int] | None = field(
        None, help="multi_host: local accelerators this process uses (None: all; srun with a task per GPU: its own)"
    )
    init_timeout_s: int = field(300, help="multi_host: seconds to wait for every process to reach the coordinator")
    coordinator_bind_address: str | None = field(
        None,
        help="multi_host: HOST:PORT where process 0's coordinator listens (None: loopback when every process runs "
        "on its host, else coordinator_address's own interface; '[::]:PORT' listens on every interface)",
    )


@dataclass(frozen=True)
class DistributedSettings:
    """Resolved ``jax.distributed.initialize`` arguments.

    Attributes:
        coordinator_address: ``host:port`` of process 0's coordinator.
        num_processes: Processes in the run.
        process_id: This process's rank.
        local_device_ids: The local accelerators this process uses; None for all.
        source: Where unset values came from, for messages ("launcher config" or "SLURM job N").
        coordinator_bind_address: ``host:port`` where process 0's coordinator listens, when set by
            the option; None lets ``coordinator_bind_address`` choose.
    """

    coordinator_address: str
    num_processes: int
    process_id: int
    local_device_ids: tuple[int, ...] | None
    source: str
    coordinator_bind_address: str | None = None


def first_host(node_list: str) -> str:
    """The first host of a SLURM node list (``node[001-004,007],gpu2`` gives ``node001``)."""
    cut = next((i for i, char in enumerate(node_list) if char in ",["), len(node_list))
    if cut == len(node_list) or node_list[cut] == ",":
        return node_list[:cut]
    ranges = node_list[cut + 1 :]
    end = next((i for i, char in enumerate(ranges) if char in ",-]"), len(ranges))
    return node_list[:cut] + ranges[:end]


def slurm_coordinator(step: SlurmStep) -> str:
    """Where process 0 of a SLURM step serves the coordinator: its first node (``localhost`` when the
    step has one node, so the coordinator listens on loopback only), on a port derived from the job id
    (as ``jax.distributed`` picks it), so every task computes the same address."""
    host = "localhost" if step.num_nodes == 1 else first_host(step.node_list)
    return f"{host}:{step.job_id % 2**12 + (65535 - 2**12 + 1)}"


def _missing(key: str) -> LaunchError:
    job = slurm_job_id()
    where = (
        f"this process runs in SLURM job {job} but not in a job step; start it with srun"
        if job is not None
        else "this process is not in a SLURM job step"
    )
    return LaunchError(
        f"{_KEY}.{key} is not set and {where}; set {_KEY}.coordinator_address, num_processes and process_id, "
        "or start every process with srun"
    )


def _from_step(value: int | None, step: SlurmStep | None, key: str) -> int:
    if value is not None:
        return value
    if step is None:
        raise _missing(key)
    return step.num_tasks if key == "num_processes" else step.task_id


def _local_device_ids(options: DistributedOptions, step: SlurmStep | None) -> tuple[int, ...] | None:
    if options.local_device_ids is not None:
        ids = tuple(options.local_device_ids)
        if not ids or min(ids) < 0 or len(set(ids)) != len(ids):
            raise LaunchError(f"{_KEY}.local_device_ids={list(ids)} must be distinct non-negative ids, or null")
        return ids
    if step is not None and step.num_tasks > step.num_nodes:
        return (step.local_task_id,)  # several tasks per node: one accelerator each (srun --gpus-per-task)
    return None


def resolve_settings(options: DistributedOptions, step: SlurmStep | None) -> DistributedSettings:
    """The settings to initialize with: each option that is set, else the SLURM step's value.

    Args:
        options: ``launcher.distributed``.
        step: The SLURM job step this process runs in (``xax.utils.env.slurm_step()``), or None.

    Returns:
        The checked settings.

    Raises:
        LaunchError: Naming the option that is unset with no SLURM step to take it from, or invalid.
    """
    address = options.coordinator_address
    if address is None:
        if step is None:
            raise _missing("coordinator_address")
        address = slurm_coordinator(step)
    num_processes = _from_step(options.num_processes, step, "num_processes")
    process_id = _from_step(options.process_id, step, "process_id")
    for key, value in (
        ("coordinator_address", address),
        ("coordinator_bind_address", options.coordinator_bind_address),
    ):
        match = None if value is None else _ADDRESS.fullmatch(value)
        if value is not None and (match is None or not 0 < int(match.group("port")) < 65536):
            raise LaunchError(f"{_KEY}.{key}={value!r} is not HOST:PORT; e.g. 10.0.0.1:12345")
    if num_processes < 1:
        raise LaunchError(f"{_KEY}.num_processes={num_processes} must be at least 1")
    if not 0 <= process_id < num_processes:
        raise LaunchError(f"{_KEY}.process_id={process_id} must be from 0 to num_processes - 1 = {num_processes - 1}")
    if options.init_timeout_s < 1:
        raise LaunchError(f"{_KEY}.init_timeout_s={options.init_timeout_s} must be at least 1")
    given = (options.coordinator_address, options.num_processes, options.process_id)
    source = "launcher config" if step is None or None not in given else f"SLURM job {step.job_id}"
    return DistributedSettings(
        address, num_processes, process_id, _local_device_ids(options, step), source, options.coordinator_bind_address
    )


def _split(address: str) -> tuple[str, int]:
    """``(host, port)`` of a checked ``HOST:PORT``; an IPv6 host loses its brackets."""
    match = _ADDRESS.fullmatch(address)
    assert match is not None, address
    return match.group("host").strip("[]"), int(match.group("port"))


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``host`` as an IP address (IPv4-mapped IPv6 ones as IPv4), or None for a host name."""
    try:
        address = ipaddress.ip_address(host.split("%")[0])  # without an IPv6 zone ("fe80::1%eth0")
    except ValueError:
        return None
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return mapped or address


def _resolves_to_loopback_only(host: str, port: int) -> bool:
    """Whether every address ``host`` has here is a loopback one (False when it does not resolve)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return False  # the coordinator's bind then fails and says so
    return all(getattr(_ip(str(info[4][0])), "is_loopback", False) for info in infos)


def coordinator_bind_address(settings: DistributedSettings) -> str:
    """Where process 0's coordinator listens: only where the other processes can reach it.

    ``launcher.distributed.coordinator_bind_address`` when set. Otherwise loopback when every process
    runs on this host (one process, or a coordinator address on loopback), and else the coordinator
    address itself, so the coordinator listens on the interfaces its host name resolves to. A host
    name that resolves to loopback on this host only (``/etc/hosts`` often maps the host's own name
    to 127.0.1.1) could not be reached from the others: then every interface, with a warning.
    """
    if settings.coordinator_bind_address is not None:
        return settings.coordinator_bind_address
    host, port = _split(settings.coordinator_address)
    if settings.num_processes == 1:
        return f"localhost:{port}"
    ip = _ip(host)
    if host.lower() == "localhost" or (ip is not None and ip.is_loopback):
        return settings.coordinator_address
    if ip is None and _resolves_to_loopback_only(host, port):
        logger.warning(
            "%s.coordinator_address=%s: %r resolves to loopback on process 0, which other hosts cannot reach; "
            "listening on every interface (set %s.coordinator_bind_address=IP:%d to this host's address)",
            _KEY,
            settings.coordinator_address,
            host,
            _KEY,
            port,
        )
        return f"[::]:{port}"
    return settings.coordinator_address


def wants_multi_host(options: DistributedOptions) -> bool:
    """Whether ``launcher.kind=auto`` should join several processes: ``launcher.distributed.num_processes``
    above 1, or an ``srun`` step of several tasks. Reads no device, so JAX can still be set up."""
    if options.num_processes is not None:
        return options.num_processes > 1
    step = slurm_step()
    return step is not None and step.num_tasks > 1


def wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Waits until something listens at ``address`` (process 0's coordinator).

    JAX ends the whole process, with no Python exception, when its client cannot reach the
    coordinator in time; checking first turns that into a LaunchError naming the setting.

    Raises:
        LaunchError: When the host is unknown, or nothing listens there within ``timeout_s``.
    """
    host, port = _split(address)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=_CONNECT_POLL_S):
                return
        except socket.gaierror as error:
            raise LaunchError(
                f"{_KEY}.coordinator_address={address}: unknown host {host!r} ({error.strerror}); use process 0's "
                "host name or IP address"
            ) from None
        except OSError as error:
            if time.monotonic() >= deadline:
                raise LaunchError(
                    f"nothing listens at {_KEY}.coordinator_address={address} after {timeout_s:.0f} s "
                    f"({error.strerror or error}); start process 0 there, check the address and port, or raise "
                    f"{_KEY}.init_timeout_s"
                ) from None
            time.sleep(_CONNECT_POLL_S)


def initialize(settings: DistributedSettings, timeout_s: int) -> None:
    """Joins this process to the others with ``jax.distributed.initialize`` (once per process).

    Raises:
        LaunchError: When JAX has already started its devices, or the coordinator cannot be reached.
    """
    if jax.distributed.is_initialized():
        return
    if xla_bridge.backends_are_initialized():
        raise LaunchError(
            "launcher.kind=multi_host must set up jax.distributed before JAX starts its devices; launch the task "
            "before any JAX computation in this process"
        )
    if settings.process_id != 0:
        wait_for_coordinator(settings.coordinator_address, timeout_s)
    # Only process 0 serves the coordinator; the others' bind address is unused.
    bind = coordinator_bind_address(settings) if settings.process_id == 0 else None
    # A single process serves and reaches its coordinator on loopback, whatever host the address names.
    single = settings.num_processes == 1 and settings.coordinator_bind_address is None
    address = bind if single else settings.coordinator_address
    if bind is not None:
        logger.info("multi_host: the coordinator listens on %s", bind)
    try:
        jax.distributed.initialize(
            coordinator_address=address,
            num_processes=settings.num_processes,
            process_id=settings.process_id,
            local_device_ids=None if settings.local_device_ids is None else list(settings.local_device_ids),
            # Every value is resolved above; JAX's own detection would pin one GPU per SLURM node.
            cluster_detection_method="deactivate",
            initialization_timeout=timeout_s,
            coordinator_bind_address=bind,
        )
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if bind is not None:
            raise LaunchError(
                f"process 0 of {settings.num_processes} could not serve the coordinator on {bind} or gather the "
                f"others within {timeout_s} s ({reason}); {bind} must be an address of this host with a free port "
                f"(else set {_KEY}.coordinator_bind_address), and every process must start within "
                f"{_KEY}.init_timeout_s"
            ) from error
        raise LaunchError(
            f"process {settings.process_id} of {settings.num_processes} could not join the coordinator at "
            f"{_KEY}.coordinator_address={settings.coordinator_address} within {timeout_s} s ({reason}); check "
            f"that process 0 is running and reachable at that address, or raise {_KEY}.init_timeout_s"
        ) from error


def global_devices() -> list[jax.Device]:
    """Every process's devices, grouped by process, so each process's rows of a batch are one block."""
    return sorted(jax.devices(), key=lambda device: (device.process_index, device.id))


class MultiHostLauncher(Launcher):
    """Runs the task in every process of a ``jax.distributed`` run, over one global mesh.

    Args:
        options: ``launcher.distributed``; unset values come from the SLURM job step.
    """

    def __init__(self, options: DistributedOptions) -> None:
        self.options = options

    @override
    def place(self) -> Placement:
        settings = resolve_settings(self.options, slurm_step())
        initialize(settings, self.options.init_timeout_s)
        devices = global_devices()
        logger.info(
            "Process %d of %d (settings from %s): %d local of %d devices",
            jax.process_index(),
            jax.process_count(),
            settings.source,
            len(jax.local_devices()),
            len(devices),
        )
        return Placement(tuple(devices), lockstep=True)
