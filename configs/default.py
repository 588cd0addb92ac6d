"""Base config: every field the programs read, with OpenAI's defaults.

The defaults live in the package (`diffusion_jax/runtime/defaults.py`, every
field commented there) so that an installed library reads stored configs with
the same defaults; variants import `get_config()` from here and override fields.
Override any field from the command line, e.g.
`python train.py --config=configs/cifar10.py --config.train.batch_size=256`.
"""

from diffusion_jax.runtime.defaults import get_config, glide_model  # noqa: F401
