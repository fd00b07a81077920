"""Test set-up: 8 simulated CPU devices, set before jax is imported anywhere, and a persistent XLA
compilation cache shared by the test processes (pytest-xdist workers and the CLI subprocesses some
tests start): many tests compile the same tiny train steps, and a cache hit replaces a multi-second CPU
compile by a file read. The cache is keyed by the compiled program, so it never changes a result."""

import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".pytest_cache" / "xla"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")
