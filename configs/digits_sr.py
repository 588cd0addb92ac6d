"""Super-resolution on the digits: 4x4 -> 8x8 (guided-diffusion's `super_res_train.py`, small).

`kind="super_res"` trains a `SuperResUNet`: the network sees x_t beside the
bilinearly upsampled low-resolution image (in_channels = 2 x 1), and the
low-resolution input is the training image area-downsampled to
`super_res.small_size` (OpenAI's `F.interpolate(mode="area")`, not quantised).
Class-conditional, like guided-diffusion's ImageNet upsamplers (set
`model.num_classes=None` for an unconditional one).

The `base` variant is a 4x4 class-conditional digits model to cascade from:

    python train.py --config=configs/digits_sr.py
    python train.py --config=configs/digits_sr.py:base --workdir=runs/digits_sr_base
    python sample.py --workdir=runs/digits_sr_base --upsampler_workdir=runs/digits_sr --labels=0,1,2,3,4,5,6,7,8,9
    python sample.py --workdir=runs/digits_sr --base_samples=FILE.npz   # any 4x4x1 OpenAI-format samples
"""

import ml_collections

from configs import default

SMALL_SIZE = 4


def get_config(variant=None):
    if variant == "base":
        return _base()
    if variant:
        raise ValueError(f"unknown variant {variant!r} of configs/digits_sr.py; accepted: base")
    c = default.get_config()
    c.kind = "super_res"
    c.super_res = ml_collections.ConfigDict(dict(
        small_size=SMALL_SIZE,  # The low-res side: training images are area-downsampled to this.
    ))
    c.model.update(
        image_size=8, in_channels=2, out_channels=2, model_channels=32, num_res_blocks=2,
        attention_resolutions=(2,), channel_mult=(1, 2), num_classes=10, null_label=False,
        num_heads=4, dropout=0.0)
    c.diffusion.update(noise_schedule="cosine", diffusion_steps=1000, var_type="learned_range",
                       loss_type="rescaled_mse")
    c.data.update(name="digits", image_size=8, channels=1)
    c.optim.update(lr=1e-3, warmup_steps=100, anneal=True, grad_clip=1.0)
    c.train.update(batch_size=64, num_steps=1000, ema_rates=(0.999,), ema_warmup=True, p_uncond=0.0, log_every=50,
                   checkpoint_every=500, sample_every=0, eval_every=0)
    c.sample.update(num_per_class=4, timestep_respacing="100", cfg_scale=0.0)
    return c


def _base():
    """The 4x4 base of the cascade: the main job's model at 4x4 (class-conditional, null label)."""
    from configs import digits

    c = digits.get_config()
    c.model.update(image_size=SMALL_SIZE, channel_mult=(1, 2), attention_resolutions=(2,))
    c.data.update(image_size=SMALL_SIZE)
    c.train.update(num_steps=1000, checkpoint_every=500, sample_every=0, eval_every=0)
    return c
