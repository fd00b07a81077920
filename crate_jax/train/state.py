"""The train state's layout, written in one place (the parts are described in `crate_jax/train/task.py`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def train_state(step, params, opt_state, buffers=None, extras=None) -> dict:
    """The train state (described in `crate_jax/train/task.py`): `buffers` / `extras` only when there are any. The same
    function builds a state of arrays, of shardings or of shapes."""
    state = {"step": step, "params": params, "opt_state": opt_state}
    if buffers:
        state["buffers"] = buffers
    if extras:
        state["extras"] = extras
    return state


def state_parts(state: Mapping[str, Any]) -> tuple[Any, dict, dict]:
    """`(params, buffers, extras)` of a train state (`{}` for a part it does not have)."""
    return state["params"], state.get("buffers", {}), state.get("extras", {})
