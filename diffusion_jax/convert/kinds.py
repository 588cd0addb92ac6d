"""The model kinds: one literal table from ``kind`` to everything the programs need to know about it.

``config.kind`` (training), the ``kind`` of a converted or trained work
directory's ``config.json``, and ``flags["kind"]`` of ``convert.from_openai``
are keys of ``KINDS``. Code asks this table instead of testing kind strings:

    spec = kinds.get(config.kind)       # ValueError listing the kinds for an unknown one
    spec.module(**config.model)         # the Flax module
    "tokens" in spec.inputs             # text-conditional (GLIDE)
    spec.trains, spec.samples           # train.py / sample.py accept it

Adding a kind: write its module (``models/``), then add one row here; its
``dialect`` picks the family's ``Conversion`` in ``convert/conversions.py``.

The table imports only ``models``, so the family mappings of this package
(``adm``, ``glide``, ``clip``, ``openai_flags``) ask it too; ``conversions``
binds each dialect to its mapping, and ``runtime`` and the programs above
read the table.
"""

from __future__ import annotations

import dataclasses

from diffusion_jax.models import classifier, unet
from diffusion_jax.models import clip as clip_models
from diffusion_jax.models import clip_pair
from diffusion_jax.models import glide as glide_models

# What a network takes beside (x, timesteps):
#   labels  - class labels y [B] (int32; optional: only when model.num_classes is set)
#   tokens  - a caption: tokens [B, text_ctx] int32 and mask [B, text_ctx] bool
#   low_res - the image to upsample, NHWC (super-resolution)
#   inpaint - inpaint_image NHWC and inpaint_mask [B, H, W, 1]
INPUTS = ("labels", "tokens", "low_res", "inpaint")
ROLES = ("denoiser", "classifier", "encoder", "clip")
# Whose flag names ``convert.from_openai`` reads for a kind: "adm" (improved-/guided-diffusion
# ``script_util``), "glide" (glide-text2im ``model_creation``), "clip" (glide-text2im ``clip/config.yaml``).
DIALECTS = ("adm", "glide", "clip")


@dataclasses.dataclass(frozen=True)
class Kind:
    """One model kind.

    Attributes:
      name: the ``kind`` string.
      module: the Flax module class; ``module(**config.model)``.
      role: "denoiser" (predicts eps/x0/v and variances), "classifier" (noisy
        classifier: logits), "encoder" (CLIP: embeddings), "clip" (a CLIP pair: both
        towers and a logit scale, trained contrastively).
      inputs: which of ``INPUTS`` it takes beside ``(x, timesteps)``.
      trains: ``train.py`` trains it.
      samples: ``sample.py`` samples it as the model of ``--workdir`` (GLIDE's
        upsampler is sampled only as the second stage, ``--upsampler_workdir``).
      dialect: one of ``DIALECTS``; ``convert.conversions.of(name)`` is how
        ``convert.from_openai`` imports OpenAI's checkpoints of it.
    """

    name: str
    module: type
    role: str
    inputs: frozenset
    trains: bool
    samples: bool
    dialect: str

    @property
    def from_noise(self) -> bool:
        """A denoiser that starts from noise alone: no image input (``low_res``, ``inpaint``)."""
        return self.role == "denoiser" and not self.inputs & {"low_res", "inpaint"}


def _k(name, module, role, inputs, *, trains, samples, dialect) -> Kind:
    return Kind(name, module, role, frozenset(inputs), trains, samples, dialect)


KINDS: dict[str, Kind] = {
    "unet": _k("unet", unet.UNet, "denoiser", ["labels"], trains=True, samples=True, dialect="adm"),
    "super_res": _k("super_res", unet.SuperResUNet, "denoiser", ["labels", "low_res"],
                    trains=True, samples=True, dialect="adm"),
    "classifier": _k("classifier", classifier.EncoderUNet, "classifier", [],
                     trains=True, samples=False, dialect="adm"),
    "glide": _k("glide", glide_models.Text2ImUNet, "denoiser", ["tokens"],
                trains=True, samples=True, dialect="glide"),
    "glide_upsample": _k("glide_upsample", glide_models.SuperResText2ImUNet, "denoiser", ["tokens", "low_res"],
                         trains=True, samples=False, dialect="glide"),
    "glide_inpaint": _k("glide_inpaint", glide_models.InpaintText2ImUNet, "denoiser", ["tokens", "inpaint"],
                        trains=True, samples=True, dialect="glide"),
    "glide_upsample_inpaint": _k("glide_upsample_inpaint", glide_models.SuperResInpaintText2ImUNet, "denoiser",
                                 ["tokens", "low_res", "inpaint"], trains=True, samples=False, dialect="glide"),
    "clip_image": _k("clip_image", clip_models.ImageEncoder, "encoder", [],
                     trains=False, samples=False, dialect="clip"),
    "clip_text": _k("clip_text", clip_models.TextEncoder, "encoder", [],
                    trains=False, samples=False, dialect="clip"),
    # Both noised-CLIP towers trained contrastively from scratch (training/clip.py); CLIP guidance
    # (sample.py --clip_workdir) uses it. OpenAI publishes the towers as two checkpoints, not as a pair.
    "clip": _k("clip", clip_pair.ClipPair, "clip", [], trains=True, samples=False, dialect="clip"),
}


def get(kind: str) -> Kind:
    """The row of ``kind``.

    Raises:
      ValueError: an unknown kind (the message lists the known ones).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; accepted: {sorted(KINDS)}")
    return KINDS[kind]


def names(*, trains: bool | None = None, samples: bool | None = None, takes: str | tuple = (),
          role: str | None = None, dialect: str | None = None) -> tuple[str, ...]:
    """Kinds matching every given filter, in table order (for messages, choices and membership tests).

    ``takes``: an input name, or several, all of which the kind must take.
    """
    want = {takes} if isinstance(takes, str) else set(takes)
    return tuple(k.name for k in KINDS.values()
                 if (trains is None or k.trains == trains) and (samples is None or k.samples == samples)
                 and want <= k.inputs and (role is None or k.role == role)
                 and (dialect is None or k.dialect == dialect))


def takes(kind: str, what: str) -> bool:
    """Whether ``kind`` takes the input ``what`` (one of ``INPUTS``)."""
    if what not in INPUTS:
        raise ValueError(f"unknown input {what!r}; accepted: {INPUTS}")
    return what in get(kind).inputs


def denoiser_taking(kind: str, *inputs: str) -> bool:
    """Whether ``kind`` is a denoiser whose inputs are exactly ``inputs``: ("labels",) is the ADM U-Net,
    ("tokens",) GLIDE's base model, ("tokens", "low_res") its upsampler, and so on."""
    unknown = set(inputs) - set(INPUTS)
    if unknown:
        raise ValueError(f"unknown inputs {sorted(unknown)}; accepted: {INPUTS}")
    spec = get(kind)
    return spec.role == "denoiser" and spec.inputs == frozenset(inputs)


def build(kind: str, **model):
    """The Flax module of ``kind`` with constructor fields ``model`` (lists become tuples)."""
    return get(kind).module(**{k: tuple(v) if isinstance(v, list) else v for k, v in model.items()})


def check_trainable(kind: str) -> Kind:
    """The row of ``kind`` if ``train.py`` trains it.

    Raises:
      ValueError: naming the kind and the trainable ones.
    """
    spec = get(kind)
    if not spec.trains:
        raise ValueError(f"config.kind={kind!r} cannot be trained here; trainable kinds: {names(trains=True)}")
    return spec
