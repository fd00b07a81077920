"""Pieces every config shares: the `get_config(arg)` argument parser and the engine defaults."""

from ml_collections import ConfigDict

from crate_jax.train.defaults import ENGINE_DEFAULTS


def parse_args(arg: str, **defaults) -> ConfigDict:
    """`'variant=B/16,res=224'` -> ConfigDict, with `defaults` for the keys not given. Unknown keys fail,
    naming the valid ones; values keep the type of their default."""
    out = dict(defaults)
    for part in filter(None, (arg or "").split(",")):
        if "=" not in part:
            raise ValueError(f"config argument {part!r} is not KEY=VALUE (arguments: {sorted(defaults)})")
        k, v = part.split("=", 1)
        if k not in defaults:
            raise ValueError(f"unknown config argument {k!r}; valid arguments: {sorted(defaults)}")
        d = defaults[k]
        out[k] = type(d)(v) if isinstance(d, (int, float)) and not isinstance(d, bool) else \
            (v.lower() in ("1", "true", "yes") if isinstance(d, bool) else v)
    return ConfigDict(out)


def auto_dtype(dtype: str, source: str) -> str:
    """`dtype=auto`: bfloat16 compute on the ImageNet source (`tfds`, a TPU or GPU run: the official recipes'
    fp16 autocast), float32 on the offline sources that run on CPU; any other value as given."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if source == "tfds" else "float32"


def base_config() -> ConfigDict:
    c = ConfigDict()
    c.update(ENGINE_DEFAULTS)  # task, seed, microbatches, log / eval / checkpoint intervals (one table)
    c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.optim = ConfigDict(dict(name="adamw", lr=1e-3, min_lr=0.0, warmup_steps=0, b1=0.9, b2=0.999,
                              mu_dtype=None, wd=0.0, wd_mask=r".*kernel", clip=0.0, freeze=[]))
    c.loss = ConfigDict(dict(label_smoothing=0.0, on_value=None, off_value=None,
                             mixup=ConfigDict(dict(enabled=False, mixup_alpha=0.8, cutmix_alpha=1.0,
                                                   switch_prob=0.5))))
    c.init = ConfigDict(dict(checkpoint=None, dont_load=r"head/.*", posemb_resample="2d"))
    c.evals = ConfigDict()  # name -> dict(type=..., every=..., ...): crate_jax.train.evaluation
    return c
