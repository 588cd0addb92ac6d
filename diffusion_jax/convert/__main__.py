"""``python -m diffusion_jax.convert``: see the package docstring."""

from diffusion_jax.convert.cli import main

if __name__ == "__main__":
    main()
