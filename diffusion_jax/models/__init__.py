"""Flax modules: the ADM U-Net, the noisy classifier and GLIDE's text models."""

from diffusion_jax.models.classifier import AttentionPool2d, EncoderUNet
from diffusion_jax.models.glide import (GLIDE_CLASSES, InpaintText2ImUNet, SuperResInpaintText2ImUNet,
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
    "build_model",
    "resolve_kernels",
    "timestep_embedding",
]


def build_model(kind: str, **kwargs):
    """Construct a model by kind: ``build_model("unet", image_size=32, ...)``.

    Args:
      kind: one of the keys of the table below ("unet", "super_res",
        "classifier"; GLIDE kinds are added beside them).
      **kwargs: the module's constructor fields.

    Raises:
      ValueError: for an unknown kind (the message lists the accepted ones).
    """
    kinds = {
        "unet": UNet,
        "super_res": SuperResUNet,
        "classifier": EncoderUNet,
        **GLIDE_CLASSES,
    }
    if kind not in kinds:
        raise ValueError(f"unknown model kind {kind!r}; accepted: {sorted(kinds)}")
    return kinds[kind](**kwargs)
