"""Improved DDPM's L_vlb model on CIFAR-10: KL loss (x T) with importance-sampled t.

OpenAI's `cifar10_uncond_vlb_50M_500K.pt`: `--use_kl True --schedule_sampler
loss-second-moment` on top of the cifar10 config.
"""

from configs import cifar10


def get_config():
    c = cifar10.get_config()
    c.diffusion.update(loss_type="rescaled_kl", schedule_sampler="loss-second-moment")
    return c
