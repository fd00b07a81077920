"""The bundled recipes as `crate_jax.configs`; their files live in the repository's top-level `configs/`.

A wheel maps that folder onto this package (pyproject.toml `package-dir`) and does not contain this file.
In a checkout (an editable install, or `PYTHONPATH=.` without installing) this file is the package and
points it at that folder, so `crate_jax.configs.digits` is `configs/digits.py` either way.
"""

from pathlib import Path as _Path

__path__ = [str(_Path(__file__).resolve().parents[2] / "configs")]
