"""The main job: a class-conditional digits model with learned variances.

Embedded dataset (scikit-learn's 8x8 handwritten digits, no network), null-
label dropout so classifier-free guidance works, learned Sigma + L_hybrid on a
cosine schedule (Nichol & Dhariwal 2021).  Sized to give recognisable,
correctly conditioned digits in minutes on a 2-core CPU.
"""

from configs import default


def get_config():
    c = default.get_config()
    c.model.update(
        image_size=8, in_channels=1, out_channels=2, model_channels=32, num_res_blocks=2,
        attention_resolutions=(2,), channel_mult=(1, 2), num_classes=10, null_label=True,
        num_heads=4, dropout=0.0)
    c.diffusion.update(noise_schedule="cosine", diffusion_steps=1000, var_type="learned_range",
                       loss_type="rescaled_mse")
    c.data.update(name="digits", image_size=8, channels=1)
    c.optim.update(lr=1e-3, warmup_steps=100, anneal=True, grad_clip=1.0)
    c.train.update(batch_size=64, num_steps=2000, ema_rates=(0.999,), ema_warmup=True, p_uncond=0.1, log_every=50,
                   checkpoint_every=500, sample_every=1000, eval_every=1000, eval_examples=128)
    c.sample.update(num_per_class=10, timestep_respacing="100", cfg_scale=1.0)
    return c
