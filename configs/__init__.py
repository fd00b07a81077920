"""The bundled recipes, one `get_config(arg)` per file, installed as `crate_jax.configs` (so they import
`crate_jax.configs.common`, never a project's own `configs` package). `--config configs/FILE.py` finds them
from any directory (crate_jax.train.config_cli)."""
