"""The model kinds: one literal table from ``kind`` to everything the programs need to know about it.

``config.kind`` (training), the ``kind`` of a converted or trained work
directory's ``config.json``, and ``flags["kind"]`` of ``convert.from_openai``
are keys of ``KINDS``. Code asks this table instead of testing kind strings:

    spec = kinds.get(config.kind)       # ValueError listing the kinds for an unknown one
    spec.module(**config.model)         # the Flax module
    "tokens" in spec.inputs             # text-conditional (GLIDE)
    spec.trains, spec.samples           # train.py / sample.py accept it

Adding a kind: write its module (``models/``), then add one row here (its
conversion may reuse a family's ``Conversion``).

The table sits in ``convert`` because each row names its module class
(``models``) and its checkpoint conversion (this package); ``runtime`` and
the programs above read it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

from diffusion_jax.convert import adm, clip, glide
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


@dataclasses.dataclass(frozen=True)
class Conversion:
    """How OpenAI's checkpoints of one family of kinds become ``(module, params)``.

    Attributes:
      dialect: whose flag names ``from_openai`` reads: "adm" (improved-/guided-
        diffusion ``script_util``), "glide" (glide-text2im ``model_creation``),
        "clip" (glide-text2im ``clip/config.yaml``).
      resolve_flags: ``flags -> {"kind", "model": <module kwargs>, "diffusion": {...}}``.
      param_shapes: ``(module, kind, model) -> {flax path: ShapeDtypeStruct}`` (no initialisation).
      params_from_state_dict: ``(module, kind, model, state_dict) -> params`` (strict).
      from_openai: ``(checkpoint, flags) -> (module, params)`` for families that
        bypass the three steps above (CLIP's encoders); None for the others.
    """

    dialect: str
    resolve_flags: Callable[[Mapping], dict]
    param_shapes: Callable | None = None
    params_from_state_dict: Callable | None = None
    from_openai: Callable | None = None


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
      conversion: how ``convert.from_openai`` imports OpenAI's checkpoints of it.
    """

    name: str
    module: type
    role: str
    inputs: frozenset
    trains: bool
    samples: bool
    conversion: Conversion


ADM = Conversion("adm", adm.resolve_adm_flags, adm.param_shapes, adm.params_from_state_dict)
GLIDE = Conversion("glide", glide.resolve_glide, glide.glide_param_shapes, glide.glide_params_from_state_dict)
CLIP = Conversion("clip", clip.resolve_clip_flags, from_openai=clip.from_openai_clip)


def _k(name, module, role, inputs, *, trains, samples, conversion) -> Kind:
    return Kind(name, module, role, frozenset(inputs), trains, samples, conversion)


KINDS: dict[str, Kind] = {
    "unet": _k("unet", unet.UNet, "denoiser", ["labels"], trains=True, samples=True, conversion=ADM),
    "super_res": _k("super_res", unet.SuperResUNet, "denoiser", ["labels", "low_res"],
                    trains=True, samples=True, conversion=ADM),
    "classifier": _k("classifier", classifier.EncoderUNet, "classifier", [],
                     trains=True, samples=False, conversion=ADM),
    "glide": _k("glide", glide_models.Text2ImUNet, "denoiser", ["tokens"],
                trains=True, samples=True, conversion=GLIDE),
    "glide_upsample": _k("glide_upsample", glide_models.SuperResText2ImUNet, "denoiser", ["tokens", "low_res"],
                         trains=True, samples=False, conversion=GLIDE),
    "glide_inpaint": _k("glide_inpaint", glide_models.InpaintText2ImUNet, "denoiser", ["tokens", "inpaint"],
                        trains=True, samples=True, conversion=GLIDE),
    "glide_upsample_inpaint": _k("glide_upsample_inpaint", glide_models.SuperResInpaintText2ImUNet, "denoiser",
                                 ["tokens", "low_res", "inpaint"], trains=True, samples=False, conversion=GLIDE),
    "clip_image": _k("clip_image", clip_models.ImageEncoder, "encoder", [],
                     trains=False, samples=False, conversion=CLIP),
    "clip_text": _k("clip_text", clip_models.TextEncoder, "encoder", [],
                    trains=False, samples=False, conversion=CLIP),
    # Both noised-CLIP towers trained contrastively from scratch (training/clip.py); CLIP guidance
    # (sample.py --clip_workdir) uses it. OpenAI publishes the towers as two checkpoints, not as a pair.
    "clip": _k("clip", clip_pair.ClipPair, "clip", [], trains=True, samples=False, conversion=CLIP),
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
                 and (dialect is None or k.conversion.dialect == dialect))


def takes(kind: str, what: str) -> bool:
    """Whether ``kind`` takes the input ``what`` (one of ``INPUTS``)."""
    if what not in INPUTS:
        raise ValueError(f"unknown input {what!r}; accepted: {INPUTS}")
    return what in get(kind).inputs


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
