"""Masked language modelling with CRATE-BERT and BERT (`crate_jax.models.bert`): the `mlm` task and its dynamic
masking data, the `mlm_loss` evaluator, GLUE fine-tuning, and inference for `predict --tokens`."""
