"""GLIDE's base text-to-image model at its real size (Nichol et al. 2021; glide-text2im `base.pt`).

`model_and_diffusion_defaults()`: Text2ImUNet 64x64, 192 channels, 3 res
blocks, channel_mult (1,2,3,4), 64-channel heads at downsample factors
(2,4,8), BigGAN up/down blocks, dropout 0.1, a 16x512x8 text transformer over
128 GPT-2 BPE tokens; T = 1000 cosine ("squaredcos_cap_v2"), learned-range
Sigma, timesteps never rescaled. Sampled with respacing "100" and guidance 3.

GLIDE released no training code or data: `data.name` is a placeholder for a
captioned TFDS dataset prepared as array_record (e.g. "coco_captions" built
with a "caption" string feature); pass the real one with
`--config.data.name=... --config.data.data_dir=...`. The tokenizer files are
GPT-2's encoder.json / vocab.bpe (glide-text2im ships them gzipped); set
`--config.text.encoder_json` and `--config.text.vocab_bpe`. The L_hybrid loss
and the optimizer settings are guided-diffusion's (GLIDE's are unpublished).
"""

from configs import default


def get_config():
    c = default.get_config()
    c.kind = "glide"
    c.model = default.glide_model()  # GLIDE base defaults (64 px, text transformer included).
    c.diffusion.update(noise_schedule="cosine", diffusion_steps=1000, timestep_respacing="",
                       rescale_timesteps=False, var_type="learned_range", loss_type="rescaled_mse")
    c.data.update(name="coco_captions", image_size=64, channels=3, random_flip=False, worker_count=8)
    c.text.update(tokenizer="glide", text_ctx=128, encoder_json="glide_tokenizer/encoder.json.gz",
                  vocab_bpe="glide_tokenizer/vocab.bpe.gz",
                  grid_prompts=("a corgi wearing a red bowtie", "an oil painting of a lighthouse at night",
                                "a bowl of fruit on a wooden table", "a crayon drawing of a space elevator"))
    c.optim.update(lr=1e-4, weight_decay=0.0, warmup_steps=0, grad_clip=1.0)
    c.train.update(batch_size=2048, num_steps=2_500_000, ema_rates=(0.9999,), p_uncond=0.2, log_every=100,
                   checkpoint_every=10_000, sample_every=10_000, eval_every=0)
    c.sample.update(num_per_class=4, timestep_respacing="100", cfg_scale=3.0)
    return c
