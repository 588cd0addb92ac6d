"""Improved DDPM on CIFAR-10 (Nichol & Dhariwal 2021, Sec. 4 / Table 2).

T = 4000 cosine, L_hybrid with learned Sigma, dropout 0.3, 128 channels,
3 res blocks, attention at 16 and 8 px; OpenAI's released
`cifar10_uncond_50M_500K.pt` flags.  Needs TFDS `cifar10` prepared in
data.data_dir (`tfds build cifar10`).
"""

from configs import default


def get_config():
    c = default.get_config()
    c.model.update(image_size=32, in_channels=3, out_channels=6, model_channels=128, num_res_blocks=3,
                   attention_resolutions=(2, 4), channel_mult=(1, 2, 2, 2), dropout=0.3, num_heads=4,
                   use_scale_shift_norm=True)
    c.diffusion.update(noise_schedule="cosine", diffusion_steps=4000, rescale_timesteps=True,
                       var_type="learned_range", loss_type="rescaled_mse")
    c.data.update(name="cifar10", image_size=32, channels=3, random_flip=True, worker_count=4)
    c.optim.update(lr=1e-4)
    c.train.update(batch_size=128, num_steps=500_000, ema_rates=(0.9999,), log_every=100,
                   checkpoint_every=10_000, sample_every=10_000, eval_every=10_000)
    return c
