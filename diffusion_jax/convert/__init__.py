"""Import OpenAI's improved-/guided-diffusion, GLIDE and noised-CLIP checkpoints into Flax, exactly.

Layers (each imports only those above it):

* ``state_dict``: reading ``.pt`` (``torch.load(weights_only=True)``) /
  ``.npz`` / ``.safetensors`` / mappings, torch <-> Flax names and layouts,
  strict mapping (one ``CheckpointError`` lists every missing, unexpected and
  mis-shaped key). Loading never executes code.
* ``kinds``: the table from ``kind`` to module class, inputs, role, whether it
  trains / samples, and its flag dialect (imports only ``models``).
* ``openai_flags`` (flag dialects, ``str2bool``/``coerce_flag``; ``presets``),
  then the families: ``adm`` (U-Net, super-res U-Net, classifier), ``glide``,
  ``clip``; ``conversions`` binds each dialect to its family's ``Conversion``.
* ``api``: ``from_openai`` (dispatches through ``conversions``), converted directories;
  ``cli``: ``python -m diffusion_jax.convert``.

CLI::

    python -m diffusion_jax.convert --checkpoint 64x64_diffusion.pt --preset 64x64_diffusion --out DIR
    python -m diffusion_jax.convert --checkpoint model.pt --flags "--image_size 32 ..." --repo improved --out DIR
    python -m diffusion_jax.convert --checkpoint base.pt --preset base --out DIR        # GLIDE (glide-text2im)
    python -m diffusion_jax.convert --checkpoint m.pt --flags "--xf_width 512 ..." --repo glide --out DIR
    python -m diffusion_jax.convert --checkpoint image-enc.pt --text_checkpoint text-enc.pt --preset clip \
        --clip_vocab bpe_simple_vocab_16e6.txt.gz --out DIR          # GLIDE's noised CLIP: a pair directory

writes ``DIR/config.json`` and ``DIR/params.safetensors``; ``load_converted(DIR)``
reads them back (a CLIP pair directory: ``clip_towers.load_pair(DIR)``).
"""

from diffusion_jax.convert.api import (  # noqa: F401  (the public API)
    convert_state_dict,
    from_openai,
    load_converted,
    param_shapes,
    params_from_state_dict,
    save_converted,
)
from diffusion_jax.convert.cli import main  # noqa: F401
from diffusion_jax.convert.openai_flags import (  # noqa: F401
    parse_flag_string,
    parse_openai_flags,
    resolve_flags,
    str2bool,
)
from diffusion_jax.convert.presets import PRESETS, resolve_preset  # noqa: F401
from diffusion_jax.convert.state_dict import (  # noqa: F401
    CheckpointError,
    load_state_dict,
    map_state_dict,
    to_flax,
    torch_key,
    torch_shape,
)
