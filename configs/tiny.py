"""Tests and CI: 8x8 images, T = 10, width 32 (GroupNorm needs 32 groups).  Runs in seconds."""

from configs import default


def get_config():
    c = default.get_config()
    c.model.update(image_size=8, in_channels=1, out_channels=2, model_channels=32, num_res_blocks=1,
                   attention_resolutions=(2,), channel_mult=(1, 2), num_classes=10, null_label=True,
                   num_heads=2)
    c.diffusion.update(noise_schedule="cosine", diffusion_steps=10)
    c.data.update(name="digits", image_size=8, channels=1)
    c.optim.update(lr=1e-3)
    c.train.update(batch_size=8, num_steps=4, ema_rates=(0.9, 0.99), p_uncond=0.2, log_every=1,
                   checkpoint_every=2, sample_every=0, keep_checkpoints=5)
    c.sample.update(num_per_class=1, timestep_respacing="")
    return c
