"""Shared by the self-supervised engine tests: a crashing data iterator and a per-test compilation cache."""

import jax
import pytest


class CrashAfter:
    """Delegates to a data iterator and raises before batch `n` (a crash mid-run)."""

    def __init__(self, it, n):
        self.it, self.n, self.i = it, n, 0

    def __next__(self):
        if self.i == self.n:
            raise RuntimeError(f"simulated crash before batch {self.n}")
        self.i += 1
        return next(self.it)

    def __getattr__(self, name):
        return getattr(self.it, name)


@pytest.fixture
def compile_cache(tmp_path):
    """A persistent compilation cache for one test: runs of the same config compile their step once."""
    old = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax_cache"))
    yield
    jax.config.update("jax_compilation_cache_dir", old)
