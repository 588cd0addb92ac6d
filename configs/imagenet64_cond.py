"""ADM class-conditional ImageNet 64x64 (Dhariwal & Nichol 2021, Table 14).

guided-diffusion's `64x64_diffusion.pt` flags: 192 channels, 3 res blocks,
64-channel heads at 32/16/8 px, new attention order, BigGAN up/down, dropout
0.1, cosine T = 1000, learned Sigma, MSE (lambda = 1/T), bf16 compute.  The
null label is on so the same model also serves classifier-free guidance.
Needs an ImageNet-64 TFDS dataset or image folder (data.name).
"""

from configs import default


def get_config():
    c = default.get_config()
    c.model.update(image_size=64, in_channels=3, out_channels=6, model_channels=192, num_res_blocks=3,
                   attention_resolutions=(2, 4, 8), channel_mult=(1, 2, 3, 4), dropout=0.1,
                   num_classes=1000, null_label=True, num_head_channels=64, use_scale_shift_norm=True,
                   resblock_updown=True, use_new_attention_order=True, dtype="bfloat16", use_checkpoint=True)
    c.diffusion.update(noise_schedule="cosine", diffusion_steps=1000, var_type="learned_range", loss_type="mse")
    c.data.update(name="imagenet_resized/64x64", train_split="train", eval_split="validation",
                  image_size=64, channels=3, random_flip=True, worker_count=8)
    c.optim.update(lr=3e-4)
    c.train.update(batch_size=2048, num_steps=540_000, ema_rates=(0.9999,), p_uncond=0.1,
                   checkpoint_every=10_000, sample_every=20_000)
    c.sample.update(cfg_scale=1.0, timestep_respacing="250")
    return c
