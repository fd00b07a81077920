"""The engine's defaults, in one table: what a config that leaves an engine key out gets (the loop, the
checkpointer and the step read them from here), and what `configs/common.py` writes into every recipe."""

ENGINE_DEFAULTS = {
    "task": "classification",
    "seed": 0,
    "microbatches": 1,
    "log_every": 100,
    "eval_every": 0,  # 0: evaluators run at the end only, unless their own `every` says otherwise
    "checkpoint_every": 1000,
    "keep_checkpoints": 3,
    "keep_period": None,
    "async_checkpoints": True,
}


def engine_value(config, key: str):
    """`config[key]`, or the engine default when the config leaves it out (or sets it to None where the default
    is not None)."""
    value = config.get(key, None)
    return ENGINE_DEFAULTS[key] if value is None else value
