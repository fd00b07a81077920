"""Import the official models from checkouts named on the command line (never vendored here).

* `alpha_module(checkout)`: UCSC-VLAA/CRATE-alpha's `models/crate.py` (big_vision fork, flax linen).
  Its package imports `helpers.utils`, which needs TensorFlow's `gfile` for checkpoint I/O; the model
  itself never calls it, so an empty stand-in module is registered under that name first.
* `torch_crate_module(checkout)`: Ma-Lab-Berkeley/CRATE's `model/crate.py` (torch, einops).

Bring the repositories onto the machine with git (`git clone https://github.com/UCSC-VLAA/CRATE-alpha`,
`git clone https://github.com/Ma-Lab-Berkeley/CRATE`) and keep them outside this repository.
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path


def _checkout(path: str, marker: str) -> Path:
    root = Path(path).expanduser().resolve()
    if not (root / marker).is_file():
        raise SystemExit(f"{root} is not the expected checkout: {marker} is missing there")
    return root


def alpha_module(checkout: str):
    """The official JAX `models.crate` module (its `Model(num_classes, variant=...)` is a flax linen model)."""
    root = _checkout(checkout, "models/crate.py")
    if str(root) not in sys.path:
        sys.path.append(str(root))  # appended: the checkout's `configs` must not shadow ours
    sys.modules.setdefault("helpers.utils", types.ModuleType("helpers.utils"))
    return importlib.import_module("models.crate")


def torch_crate_module(checkout: str):
    """The official torch `model.crate` module (`CRATE_tiny()`, `CRATE_base()`, ...)."""
    root = _checkout(checkout, "model/crate.py")
    if str(root) not in sys.path:
        sys.path.append(str(root))
    return importlib.import_module("model.crate")
