"""``python -m diffusion_jax.convert``: see the package docstring."""

from diffusion_jax.convert.cli import main

if __name__ == "__main__":
    from diffusion_jax.runtime.cli import run_plain  # the programs' error wrapper (an entry point may use it)

    run_plain(main)
