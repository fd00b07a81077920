"""`python -m crate_jax COMMAND ...`: the same as the `crate-jax` console command (see `crate_jax.cli`)."""

from crate_jax.cli import main

if __name__ == "__main__":
    main()
