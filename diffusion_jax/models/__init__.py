"""Flax modules: the ADM U-Net, the noisy classifier and GLIDE's text models.

A module by kind name: ``convert.kinds.build(kind, **fields)`` (the kind table sits in ``convert``).
"""

from diffusion_jax.models.classifier import AttentionPool2d, EncoderUNet
from diffusion_jax.models.glide import (InpaintText2ImUNet, SuperResInpaintText2ImUNet,
                                        SuperResText2ImUNet, Text2ImUNet)
from diffusion_jax.models.kernels import KERNELS, resolve_kernels
from diffusion_jax.models.layers import timestep_embedding
from diffusion_jax.models.unet import SuperResUNet, UNet

__all__ = [
    "AttentionPool2d",
    "EncoderUNet",
    "InpaintText2ImUNet",
    "KERNELS",
    "SuperResInpaintText2ImUNet",
    "SuperResText2ImUNet",
    "Text2ImUNet",
    "SuperResUNet",
    "UNet",
    "resolve_kernels",
    "timestep_embedding",
]

