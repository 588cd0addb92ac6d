"""A small noised CLIP pair trained contrastively on the captioned digits (GLIDE Sec. 2.4).

Image tower: GLIDE's noised ViT on 2x2 patches of the 8x8 grey digits (repeated
to RGB), with a timestep table over the same 1000-step cosine schedule as
configs/glide_digits.py; text tower: a causal transformer over UTF-8 bytes
(the byte tokenizer, 257 ids) read at the caption's end token. Symmetric
InfoNCE with CLIP's learned temperature, at uniform random t. Then guide the
GLIDE digits model (GLIDE's recipe: the conditional model, no --cfg_scale):

    python train.py --config=configs/digits_clip.py                 # -> runs/digits_clip
    python sample.py --workdir=runs/glide_digits --prompt="a handwritten seven" \
        --clip_workdir=runs/digits_clip --clip_scale=10 --timestep_respacing=50
    python scripts/digits_clip_demo.py --workdir=runs/glide_digits --clip_workdir=runs/digits_clip \
        --clip_scales=0,3,10,30 --timestep_respacing=50

Measured (400 steps, about 20 minutes on a shared 2-core CPU at load ~20): the
loss leaves its collapse plateau log(128) = 4.85 near step 200 and ends at 4.29
(the best possible is about log(B / 10) = 2.5: captions of the same digit are
indistinguishable from the image); zero-shot accuracy on noised test digits
0.52 at t = 0, 0.29 at t = 500; prompted-digit accuracy of the GLIDE digits model
(100 samples, 50 steps) 0.32 without CLIP guidance, 0.51 / 0.57 / 0.65 at
scales 3 / 10 / 30. A lr of 3e-3 (batch 64) stayed on the plateau longer.
"""

import ml_collections

from configs import default


def clip_model(**overrides):
    """The model group of kind "clip": fields of `models.clip_pair.ClipPair`."""
    m = ml_collections.ConfigDict(dict(
        image_size=8,  # Must equal data.image_size.
        patch_size=2,  # 16 patches + the timestep token.
        image_channels=1,  # Must equal data.channels (1: grey, repeated to RGB inside).
        n_embd=64,  # Shared embedding width.
        n_head_image=2,
        n_xf_blocks_image=2,
        n_head_text=2,
        n_xf_blocks_text=2,
        n_head_state=32,  # Channels per head: both towers are 64 wide.
        n_timestep=1000,  # Must cover diffusion.diffusion_steps (the guided model's T).
        n_vocab=257,  # The byte tokenizer's ids.
        text_ctx=48,  # Must equal text.text_ctx.
        dtype="float32",
        kernels="auto",
    ))
    m.update(overrides)
    return m


def get_config():
    c = default.get_config()
    c.kind = "clip"
    c.model = clip_model()
    # The schedule of the model it guides (configs/glide_digits.py): same noise levels at each t.
    c.diffusion.update(noise_schedule="cosine", diffusion_steps=1000)
    c.data.update(name="digits", image_size=8, channels=1)
    c.text.update(tokenizer="byte", text_ctx=48, grid_prompts=())
    c.optim.update(lr=1e-3, weight_decay=0.0, warmup_steps=50, anneal=True, grad_clip=1.0)
    c.train.update(batch_size=128, num_steps=400, ema_rates=(0.99,), log_every=20, checkpoint_every=200,
                   sample_every=0, eval_every=0)
    return c
