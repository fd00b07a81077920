"""White-box language models as a task family: the LM task (`task`), its evaluators (`evaluators`),
inference helpers shared by the command-line tools (`inference`) and the offline demo (`crate_jax.demos.lm`).

Submodules are imported explicitly (``from crate_jax.lm import task``)."""
