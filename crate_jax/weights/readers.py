"""Reading weight files into flat `name -> np.ndarray` dicts, and writing them back.

File types (chosen by extension):

* `.pth` / `.pt` / `.bin`: a pickled torch state_dict, read with `torch.load(weights_only=True)`
  (so no code in the file runs). A training wrapper `{'state_dict': ...}` (docs/weights.md §Layouts) is unwrapped.
* `.npz`: numpy archive, e.g. a big_vision checkpoint (docs/weights.md §Layouts). bfloat16 arrays stored as 2-byte
  void (`|V2`) are re-viewed as `ml_dtypes.bfloat16`.
* `.safetensors`: read with `safetensors.numpy` (bfloat16 comes back as `ml_dtypes.bfloat16`).

Names are returned exactly as stored; prefixes such as `module.` or `params/` are the layout's
business (`crate_jax.weights.layouts`). Values keep their stored dtype, bit for bit.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import ml_dtypes
import numpy as np

TORCH_SUFFIXES = (".pth", ".pt", ".bin")
NPZ_SUFFIXES = (".npz",)
SAFETENSORS_SUFFIXES = (".safetensors",)
SUFFIXES = TORCH_SUFFIXES + NPZ_SUFFIXES + SAFETENSORS_SUFFIXES

# Keys under which training scripts nest the state_dict (CRATE `main.py` uses 'state_dict').
_WRAPPER_KEYS = ("state_dict", "model")


class WeightsError(ValueError):
    """A weight file that cannot be read or does not fit the expected layout; the message names the
    file and what was expected."""


def file_kind(path: str | os.PathLike) -> str:
    """'torch', 'npz' or 'safetensors' from the file name; a `WeightsError` for anything else."""
    suffix = Path(path).suffix.lower()
    if suffix in TORCH_SUFFIXES:
        return "torch"
    if suffix in NPZ_SUFFIXES:
        return "npz"
    if suffix in SAFETENSORS_SUFFIXES:
        return "safetensors"
    raise WeightsError(f"{path}: unknown weight file type {suffix!r}; expected one of {', '.join(SUFFIXES)}")


def import_torch(purpose: str):
    """`torch`, or a `WeightsError` that says how to get it."""
    try:
        import torch
    except ImportError as e:
        raise WeightsError(f"{purpose} needs PyTorch, which is not installed; install it "
                           f"(pip install 'crate_jax[torch]' or pip install torch), or use a .safetensors / "
                           f".npz file instead") from e
    return torch


def read_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All arrays stored in `path` as a flat dict `name -> np.ndarray` (stored dtype kept)."""
    path = Path(path)
    kind = file_kind(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    reader = {"torch": _read_torch, "npz": _read_npz, "safetensors": _read_safetensors}[kind]
    tensors = reader(path)
    if not tensors:
        raise WeightsError(f"{path}: the file holds no arrays")
    return tensors


def _read_torch(path: Path) -> dict[str, np.ndarray]:
    torch = import_torch(f"reading {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, ... depending on the damage
        raise WeightsError(f"{path}: torch.load(weights_only=True) failed: {e}") from e
    for key in _WRAPPER_KEYS:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path}: expected a state_dict (a dict of tensors), got {type(obj).__name__}")
    out, bad = {}, []
    for name, value in obj.items():
        if isinstance(value, torch.Tensor):
            out[str(name)] = torch_to_numpy(value)
        else:
            bad.append(f"{name} ({type(value).__name__})")
    if bad:
        raise WeightsError(f"{path}: entries that are not tensors: {', '.join(bad)}; expected a plain "
                           f"state_dict or {{'state_dict': state_dict}}")
    return out


def torch_to_numpy(t) -> np.ndarray:
    """A CPU torch tensor as a numpy array with the same bits (bfloat16 -> `ml_dtypes.bfloat16`)."""
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def numpy_to_torch(a: np.ndarray):
    """Inverse of `torch_to_numpy`: a torch tensor with the same bits as `a`."""
    import torch

    a = np.ascontiguousarray(a)
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    with open(path, "rb") as f:
        head = f.read(6)
    if head[:4] != b"PK\x03\x04":  # without this, numpy falls back to unpickling and reports "pickled data"
        what = "a single .npy array" if head == b"\x93NUMPY" else "not a zip archive"
        raise WeightsError(f"{path}: not a numpy .npz archive ({what}); expected an .npz written by np.savez "
                           f"(e.g. a big_vision checkpoint)")
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {name: _unvoid(name, z[name], path) for name in z.files}
    except WeightsError:
        raise
    except Exception as e:  # BadZipFile (truncated), ValueError (object arrays, which are refused), OSError ...
        raise WeightsError(f"{path}: cannot read as a numpy .npz archive ({type(e).__name__}: {e}); it is "
                           f"truncated, or holds object arrays, which are refused for safety") from e
    return out


def _unvoid(name: str, a: np.ndarray, path: Path) -> np.ndarray:
    """big_vision stores bfloat16 as 2-byte void (docs/weights.md §Layouts): view it back."""
    if a.dtype.kind == "V":
        if a.dtype.itemsize != 2 or a.dtype.names:
            raise WeightsError(f"{path}: array '{name}' has an opaque dtype {a.dtype.str} that is not "
                               f"bfloat16 (2-byte void)")
        return a.view(ml_dtypes.bfloat16)
    return a


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return dict(load_file(str(path)))
    except Exception as e:
        raise WeightsError(f"{path}: cannot read as safetensors: {e}") from e
