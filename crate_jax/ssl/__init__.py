"""Self-supervised vision on the shared engine: CRATE-MAE masked autoencoding (`mae_task`) and SimDINO
self-distillation with a coding-rate term (`simdino_task`, `simdino_loss`), their inference helpers, and
the offline demo (`crate_jax.demos.ssl`)."""
