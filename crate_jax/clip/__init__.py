"""CLIPA-style image-text pre-training (docs/math.md §CLIPA; docs/clipa.md §Recipes) on the shared engine.

* `crate_jax.clip.task`: `ClipTask`, the engine's task for `config.task == 'clip'`.
* `crate_jax.clip.loss`: global-batch contrastive and sigmoid losses, one device's rows at a time.
* `crate_jax.clip.zeroshot`: zero-shot classification and image↔text retrieval, and their evaluators.
* the demo is `crate_jax.demos.clipa` (`python -m crate_jax.demos.clipa --workdir DIR`).

The two-tower model and the text tower live in `crate_jax.models` (`two_tower`, `text`); the
official CLIPA checkpoint layout in `crate_jax.weights.clipa`. Submodules are imported explicitly,
so importing the package stays cheap.
"""
