"""GLIDE-style text-conditional inpainting on the captioned digits (glide-text2im's `base-inpaint`, small).

`kind="glide_inpaint"`: the trunk sees `concat([x_t, image * mask, mask])`
(in_channels = 2 x 1 + 1). Training erases one random rectangle per example
(`data.conditioning.inpaint_masks`, a function of (seed, example index)) and
feeds the rest with the mask channel; 1 (white) keeps a pixel, 0 (black) is
generated. Sampling replaces the known region of every x0 prediction by the
given pixels (GLIDE's notebook), so the output keeps them exactly:

    python train.py --config=configs/glide_digits_inpaint.py
    python sample.py --workdir=runs/glide_digits_inpaint --inpaint_image=IMG.png --inpaint_mask=MASK.png \\
        --prompt="a handwritten seven" --cfg_scale=3

Same network and schedule as configs/glide_digits.py.
"""

from configs import glide_digits


def get_config():
    c = glide_digits.get_config()
    c.kind = "glide_inpaint"
    c.model.in_channels = 2 * c.data.channels + 1
    c.train.update(sample_every=0, eval_every=0)
    return c
