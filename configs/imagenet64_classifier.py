"""guided-diffusion's 64x64 noisy ImageNet classifier (`64x64_classifier.pt`).

Width 128, depth 4, attention at 32/16/8 px, attention pooling, BigGAN
down-sampling, AdamW lr 3e-4 wd 0.05 with annealing, batch 256.
"""

import ml_collections

from configs import default, imagenet64_cond


def get_config():
    c = default.get_config()
    c.kind = "classifier"
    c.model = ml_collections.ConfigDict(dict(
        image_size=64, in_channels=3, model_channels=128, out_channels=1000, num_res_blocks=4,
        attention_resolutions=(2, 4, 8), dropout=0.0, channel_mult=(1, 2, 3, 4), use_checkpoint=False,
        num_heads=1, num_head_channels=64, num_heads_upsample=-1, use_scale_shift_norm=True,
        resblock_updown=True, use_new_attention_order=False, pool="attention", dtype="bfloat16"))
    c.diffusion = imagenet64_cond.get_config().diffusion
    c.data = imagenet64_cond.get_config().data
    c.optim.update(lr=3e-4, weight_decay=0.05, anneal=True)
    c.train.update(batch_size=256, num_steps=300_000, ema_rates=(), checkpoint_every=10_000,
                   sample_every=0, eval_every=1000, eval_examples=1024)
    return c
