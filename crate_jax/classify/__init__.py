"""Supervised image classification as a task family on the shared engine:

* `crate_jax.classify.task`: `ClassificationTask`, the engine's task for `config.task == 'classification'`
  (model config from `config.model`, label-smoothed cross-entropy, on-device mixup / cutmix).
* `crate_jax.classify.evaluators`: `ClassificationEvaluator` (`type='classification'`: top-1 / top-5 / loss).
* `crate_jax.classify.mixup`: mixup / cutmix of a batch.

Its data is `crate_jax.data.images` (sources, augmentation, loaders); inference on image files is the
`predict` command (`crate_jax.predict`). Submodules are imported explicitly (``from crate_jax.classify import
task``), so importing the package stays cheap.
"""
