"""Noisy digits classifier for classifier guidance (guided-diffusion's classifier_train).

Inputs are noised with q_sample at t drawn from the timestep sampler under the
same diffusion settings as configs/digits.py; cross-entropy on the labels.
"""

import ml_collections

from configs import default, digits


def get_config():
    c = default.get_config()
    c.kind = "classifier"
    c.model = ml_collections.ConfigDict(dict(
        image_size=8, in_channels=1, model_channels=32, out_channels=10, num_res_blocks=2,
        attention_resolutions=(2,), dropout=0.0, channel_mult=(1, 2), use_checkpoint=False, num_heads=1,
        num_head_channels=32, num_heads_upsample=-1, use_scale_shift_norm=True, resblock_updown=True,
        use_new_attention_order=False, pool="attention", dtype="float32"))
    c.diffusion = digits.get_config().diffusion
    c.data.update(name="digits", image_size=8, channels=1)
    c.optim.update(lr=1e-3, weight_decay=0.05, anneal=True)
    c.train.update(batch_size=64, num_steps=1000, ema_rates=(), log_every=50, checkpoint_every=500,
                   sample_every=0, eval_every=250, eval_examples=180)
    return c
