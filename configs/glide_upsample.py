"""GLIDE's text-conditional 64 -> 256 upsampler at its real size (glide-text2im `upsample.pt`).

`model_and_diffusion_defaults_upsampler()`: SuperResText2ImUNet 256x256 (the
trunk sees x and the bilinearly upsampled 64 px image: in_channels 6), 192
channels, 2 res blocks, channel_mult (1,1,2,2,4,4), 64-channel heads at
downsample factors (8,16,32), the same 16x512x8 text transformer; T = 1000
*linear* schedule. Training feeds the area-downsampled (1/4) training image,
quantised to 8 bits, as `low_res`. Sampled with DDIM on "fast27" and initial
noise x 0.997, without guidance (`sample.py --upsampler_workdir`).

`data.name` is a placeholder for a captioned TFDS dataset (see glide_base.py).
"""

from configs import default


def get_config():
    c = default.get_config()
    c.kind = "glide_upsample"
    c.model = default.glide_model(image_size=256, in_channels=6, num_res_blocks=2,
                                  attention_resolutions=(8, 16, 32), channel_mult=(1, 1, 2, 2, 4, 4))
    c.diffusion.update(noise_schedule="linear", diffusion_steps=1000, timestep_respacing="",
                       rescale_timesteps=False, var_type="learned_range", loss_type="rescaled_mse")
    c.data.update(name="coco_captions", image_size=256, channels=3, random_flip=False, worker_count=8)
    c.text.update(tokenizer="glide", text_ctx=128, encoder_json="glide_tokenizer/encoder.json.gz",
                  vocab_bpe="glide_tokenizer/vocab.bpe.gz", grid_prompts=())
    c.optim.update(lr=1e-4, warmup_steps=0, grad_clip=1.0)
    c.train.update(batch_size=512, num_steps=1_600_000, ema_rates=(0.9999,), p_uncond=0.0, log_every=100,
                   checkpoint_every=10_000, sample_every=0, eval_every=0)
    c.sample.update(num_per_class=1, timestep_respacing="fast27", use_ddim=True, cfg_scale=0.0)
    return c
