"""The bound of a guided chain: `evaluate.py --metric=nll` with `--cfg_scale` / `--classifier_workdir`.

The chain is the one `sample.py` samples with the same flags
(`generation.unet.guided_fns`): classifier-free guidance replaces the model's
eps by eps(null) + s * (eps(y) - eps(null)) (Ho & Salimans 2022, Eq. 6;
learned-variance channels from the conditional half), and classifier
guidance shifts the mean of p(x_{t-1} | x_t) at every t, the decoder
included, to mean + Sigma * s * grad log p(y | x_t) (Dhariwal & Nichol 2021,
Alg. 1).  y is each test example's TRUE label, so the number answers "how
much does guidance towards the right class cost (or gain) in bits/dim".
Scale 1 of CFG is the conditional model and scale 0 keeps the null-label
model's eps (with the conditional half's learned variance).
"""

from __future__ import annotations

import functools
import os
from typing import Any, NamedTuple


class Guidance(NamedTuple):
    """The checked guidance options of one NLL run."""

    cfg_scale: float | None
    classifier: Any  # the noisy classifier module, or None
    classifier_params: Any
    classifier_workdir: str | None
    classifier_scale: float | None
    classifier_checkpoint_step: int | None

    @property
    def active(self) -> bool:
        return self.cfg_scale is not None or self.classifier is not None


def load_guidance(o: dict, cfg: dict) -> Guidance:
    """Check the guidance options against the model's config and load the classifier.

    Args:
      o: the options (`cfg_scale`, `classifier_workdir`, `classifier_scale`;
        a `classifier_scale` of None means "not given").
      cfg: the model's filled config.

    Raises:
      ValueError: --cfg_scale on a model without a null label,
        --classifier_scale without --classifier_workdir, or a classifier of
        another image size / channel count / class count than the model.
    """
    m = cfg["model"]
    cfg_scale, cls_dir, cls_scale = o.get("cfg_scale"), o.get("classifier_workdir"), o.get("classifier_scale")
    if cfg_scale is not None and not (m.get("num_classes") is not None and m.get("null_label")):
        raise ValueError(
            f"--cfg_scale needs a class-conditional model trained with a null label, but {o['workdir']} has "
            f"num_classes={m.get('num_classes')}, null_label={m.get('null_label')}: drop --cfg_scale, or evaluate a "
            "model trained with --config.model.num_classes=N --config.model.null_label=True --config.train.p_uncond=0.1")
    if not cls_dir:
        if cls_scale is not None:
            raise ValueError(f"--classifier_scale={cls_scale} needs --classifier_workdir=<noisy classifier "
                             "(training workdir or converted directory)>")
        return Guidance(cfg_scale, None, None, None, None, None)
    from diffusion_jax.generation import unet
    from diffusion_jax.runtime import checkpoints

    classifier, cls_params, cls_cfg = checkpoints.load_for_inference(cls_dir)
    unet._check_classifier(m, cls_cfg, m.get("num_classes"))  # sample.py's checks
    return Guidance(cfg_scale, classifier, cls_params, os.path.abspath(cls_dir),
                    1.0 if cls_scale is None else float(cls_scale), cls_cfg.get("checkpoint_step"))


def check_labels(guide: Guidance, source, data: str, split: str) -> None:
    """Guidance towards the true class needs a labelled dataset (ValueError otherwise)."""
    example = source[0]
    if guide.active and "label" not in example:
        raise ValueError(
            f"guidance (--cfg_scale / --classifier_workdir) steers towards each example's true class, but "
            f"{data!r} split {split!r} has no labels (keys: {sorted(example)}): evaluate on a labelled dataset, "
            "or drop the guidance flags")


def settings(guide: Guidance) -> dict:
    """The guidance entries of the NLL report's settings (a resume with other guidance is refused)."""
    return {"cfg_scale": guide.cfg_scale, "classifier_workdir": guide.classifier_workdir,
            "classifier_scale": guide.classifier_scale,
            "classifier_checkpoint_step": guide.classifier_checkpoint_step}


def apply_fns(module, guide: Guidance, *, conditional: bool, null_index: int | None):
    """`(apply_fn, cond_apply_fn)` for `nll.make_chain_fn`, over params `(model params, classifier params)`.

    Both come from `generation.unet.guided_fns`, so the bound is that of the
    chain `sample.py` samples with the same flags; without guidance,
    `apply_fn` is the plain model and `cond_apply_fn` is None.
    """
    from diffusion_jax.generation import unet

    fns = functools.partial(unet.guided_fns, module, guide.classifier, conditional=conditional,
                            cfg_scale=guide.cfg_scale, null_index=null_index,
                            classifier_scale=guide.classifier_scale)

    def apply_fn(args, x, timesteps, y):
        return fns(args)[0](x, timesteps, y)

    def cond_apply_fn(args, x, timesteps, y):
        return fns(args)[1](x, timesteps, y)

    return apply_fn, (None if guide.classifier is None else cond_apply_fn)


def tag(o: dict) -> str:
    """The default report's name suffix of these guidance options: "" unguided, e.g. "_cfg3_clf1" guided."""
    out = "" if o.get("cfg_scale") is None else f"_cfg{o['cfg_scale']:g}"
    if o.get("classifier_workdir"):
        out += f"_clf{1.0 if o.get('classifier_scale') is None else o['classifier_scale']:g}"
    return out
