"""crate_jax: white-box transformers (CRATE, CRATE-alpha) in JAX / Flax NNX.

    import crate_jax
    config, model = crate_jax.load("bundles/B16")      # a bundle, training workdir or exported directory
    crate_jax.save(model, config, "bundles/copy")       # a self-describing bundle

`load` and `save` live in `crate_jax.checkpoint.models`; they are imported on first use, so `import
crate_jax` stays cheap (it does not import jax).
"""

__version__ = "0.1.0"
__all__ = ["load", "save", "load_hf"]


def __getattr__(name):
    if name in __all__:
        from crate_jax.checkpoint import models
        return getattr(models, name)
    raise AttributeError(f"module 'crate_jax' has no attribute {name!r}")
