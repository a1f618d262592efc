"""Compilation: jit options, the persistent compilation cache and debug switches."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import jax
from typing_extensions import override

from xax.core.config import field
from xax.task.base import BaseConfig, BaseTask
from xax.utils.env import user_cache_dir


@dataclass
class CompileOptions:
    cache: bool = field(
        True,
        help="Keep compiled programs in a persistent cache so relaunches start fast (a cache folder already set "
        "in JAX, e.g. by JAX_COMPILATION_CACHE_DIR, is kept)",
    )
    cache_dir: str | None = field(
        None, help="Cache folder; None uses JAX's if one is set, else the user cache folder (~/.cache/xax/jax)"
    )
    cache_min_compile_time_s: float = field(
        0.5, help="Only programs that took at least this long to compile are cached (small ones are cheap)"
    )
    donate: bool = field(True, help="Donate the training state's buffers to the step, halving its memory")
    debug_nans: bool | None = field(
        None,
        help="Raise at the first NaN produced by any operation (slow; for debugging); None leaves JAX's setting "
        "(JAX_DEBUG_NANS)",
    )
    disable_jit: bool | None = field(
        None, help="Run everything eagerly, op by op (very slow; for debugging); None leaves JAX's setting"
    )
    log_compiles: bool | None = field(
        None, help="Log every compilation, to find unexpected recompiles; None leaves JAX's setting"
    )


@dataclass
class CompileConfig(BaseConfig):
    compile: CompileOptions = field(CompileOptions(), help="Compilation options")


Config = TypeVar("Config", bound=CompileConfig)


class CompileMixin(BaseTask[Config], Generic[Config]):
    """Applies the compile options to JAX when the run starts (never at import), leaving alone what
    the options leave unset, and puts back every setting it changed when the run ends (a notebook
    or a test suite launches many runs in one process)."""

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self._jax_settings: dict[str, Any] = {}

    def _set_jax(self, name: str, value: Any) -> None:
        """Sets a JAX option for the run, remembering the value it had before."""
        self._jax_settings.setdefault(name, jax.config.values[name])
        jax.config.update(name, value)

    @override
    def on_run_start(self) -> None:
        options = self.config.compile
        if options.cache and (options.cache_dir is not None or not jax.config.values["jax_compilation_cache_dir"]):
            cache_dir = Path(options.cache_dir).expanduser() if options.cache_dir else user_cache_dir() / "jax"
            cache_dir.mkdir(parents=True, exist_ok=True)
            self._set_jax("jax_compilation_cache_dir", str(cache_dir))
            self._set_jax("jax_persistent_cache_min_compile_time_secs", options.cache_min_compile_time_s)
            self._set_jax("jax_persistent_cache_min_entry_size_bytes", 0)
        for name, value in (
            ("jax_debug_nans", options.debug_nans),
            ("jax_disable_jit", options.disable_jit),
            ("jax_log_compiles", options.log_compiles),
        ):
            if value is not None:
                self._set_jax(name, value)
        super().on_run_start()

    @override
    def on_run_end(self) -> None:
        try:
            super().on_run_end()
        finally:
            while self._jax_settings:
                name, value = self._jax_settings.popitem()
                jax.config.update(name, value)
