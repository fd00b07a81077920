"""The offline demos, one module per family, each `python -m crate_jax.demos.NAME` (`make demo`, `make demo-lm`,
...): they train, evaluate and export on data the project generates or a package ships. The library never
imports this package (`tests/test_install.py` checks it); a demo uses only the library's public commands and
functions."""
