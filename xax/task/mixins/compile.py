"""Compilation: jit options, the persistent compilation cache and debug switches."""

from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import jax
from typing_extensions import override

from xax.core.config import field
from xax.task.base import BaseConfig, BaseTask
from xax.utils.env import user_cache_dir


@dataclass
class CompileOptions:
    cache: bool = field(True, help="Keep compiled programs in a persistent cache so relaunches start fast")
    cache_dir: str | None = field(None, help="Cache folder; None uses the user cache folder (~/.cache/xax/jax)")
    cache_min_compile_time_s: float = field(
        0.5, help="Only programs that took at least this long to compile are cached (small ones are cheap)"
    )
    donate: bool = field(True, help="Donate the training state's buffers to the step, halving its memory")
    debug_nans: bool = field(False, help="Raise at the first NaN produced by any operation (slow; for debugging)")
    disable_jit: bool = field(False, help="Run everything eagerly, op by op (very slow; for debugging)")
    log_compiles: bool = field(False, help="Log every compilation, to find unexpected recompiles")


@dataclass
class CompileConfig(BaseConfig):
    compile: CompileOptions = field(CompileOptions(), help="Compilation options")


Config = TypeVar("Config", bound=CompileConfig)


class CompileMixin(BaseTask[Config], Generic[Config]):
    """Applies the compile options to JAX when the run starts (never at import)."""

    @override
    def on_run_start(self) -> None:
        options = self.config.compile
        if options.cache:
            cache_dir = Path(options.cache_dir) if options.cache_dir else user_cache_dir() / "jax"
            cache_dir.mkdir(parents=True, exist_ok=True)
            jax.config.update("jax_compilation_cache_dir", str(cache_dir))
            jax.config.update("jax_persistent_cache_min_compile_time_secs", options.cache_min_compile_time_s)
            jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        jax.config.update("jax_debug_nans", options.debug_nans)
        jax.config.update("jax_disable_jit", options.disable_jit)
        jax.config.update("jax_log_compiles", options.log_compiles)
        super().on_run_start()
