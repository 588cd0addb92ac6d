"""OpenAI's two noised-CLIP towers as one directory: what ``sample.py --clip_workdir`` reads.

glide-text2im releases the noised CLIP as two checkpoints (``clip/image-enc``,
``clip/text-enc``) plus CLIP's BPE vocabulary; a *CLIP pair directory* keeps
them together:

    DIR/clip_pair.json                  {"kind": "clip_towers", "image": "image", "text": "text",
                                         "vocab": "bpe_simple_vocab_16e6.txt.gz", "clip": <config.yaml keys>,
                                         "source": {...}}
    DIR/image/config.json + params.safetensors    a converted "clip_image" directory
    DIR/text/config.json + params.safetensors     a converted "clip_text" directory
    DIR/bpe_simple_vocab_16e6.txt.gz              CLIP's vocabulary (``text.load_clip_tokenizer``)

``image``, ``text`` and ``vocab`` are paths relative to DIR (or absolute), so
a hand-written ``clip_pair.json`` may point at towers and a vocabulary kept
elsewhere. ``clip`` holds the resolved ``clip/config.yaml`` keys: guidance reads
``logit_scale``, and ``beta_schedule`` / ``n_timesteps`` (the noise levels the
image tower was trained on). Written by

    python -m diffusion_jax.convert --preset=clip --checkpoint=image-enc.pt \
        --text_checkpoint=text-enc.pt --clip_vocab=bpe_simple_vocab_16e6.txt.gz --out=DIR
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from typing import Any, NamedTuple

from diffusion_jax.convert import clip
from diffusion_jax.convert.api import load_converted, save_converted

PAIR_FILE = "clip_pair.json"
PAIR_KIND = "clip_towers"
TOWER_DIRS = {"clip_image": "image", "clip_text": "text"}
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"


class ClipTowers(NamedTuple):
    """A loaded CLIP pair directory."""

    image: Any  # models.clip.ImageEncoder
    image_params: Any
    text: Any  # models.clip.TextEncoder
    text_params: Any
    flags: dict  # the resolved clip/config.yaml keys (logit_scale, beta_schedule, n_timesteps, ...)
    vocab: str  # path of CLIP's BPE vocabulary


def is_pair_dir(directory: str) -> bool:
    """Whether ``directory`` is a CLIP pair directory (holds ``clip_pair.json``)."""
    return os.path.isfile(os.path.join(directory, PAIR_FILE))


def tower_config(kind: str, flags: Mapping) -> dict:
    """``{"kind", "model", "diffusion"}`` of one tower for ``api.save_converted``.

    The image tower records the schedule its timestep table was trained on.
    """
    cfg = clip.clip_config({**flags, "kind": kind})
    f = cfg["clip"]
    diffusion = {"noise_schedule": f["beta_schedule"], "diffusion_steps": f["n_timesteps"]} \
        if kind == "clip_image" else {}
    return {"kind": kind, "model": cfg["model"], "diffusion": diffusion}


def save_pair(out_dir: str, flags: Mapping, image_params, text_params, vocab: str, source: Mapping) -> None:
    """Write a CLIP pair directory (see the module docstring); ``vocab`` is copied into it.

    Raises:
      FileNotFoundError: ``vocab`` does not exist (nothing is written).
    """
    if not os.path.isfile(vocab):
        raise FileNotFoundError(f"--clip_vocab={vocab} does not exist: pass CLIP's {VOCAB_FILE} (glide-text2im ships "
                                f"glide_text2im/tokenizer/{VOCAB_FILE}, OpenAI CLIP clip/{VOCAB_FILE})")
    resolved = clip.resolve_clip_flags(dict(flags))
    for kind, params in (("clip_image", image_params), ("clip_text", text_params)):
        save_converted(os.path.join(out_dir, TOWER_DIRS[kind]), tower_config(kind, resolved), params, dict(source))
    shutil.copyfile(vocab, os.path.join(out_dir, VOCAB_FILE))
    pair = {"kind": PAIR_KIND, "image": TOWER_DIRS["clip_image"], "text": TOWER_DIRS["clip_text"],
            "vocab": VOCAB_FILE, "clip": {k: v for k, v in resolved.items() if k != "kind"}, "source": dict(source)}
    with open(os.path.join(out_dir, PAIR_FILE), "w") as f:
        json.dump(pair, f, indent=2)


def convert_pair(image_checkpoint, text_checkpoint, flags: Mapping, vocab: str, out_dir: str,
                 source: Mapping) -> ClipTowers:
    """Import both released towers (strictly, ``clip.from_openai_clip``) and write them as a pair directory."""
    image, image_params = clip.from_openai_clip(image_checkpoint, {**flags, "kind": "clip_image"})
    text, text_params = clip.from_openai_clip(text_checkpoint, {**flags, "kind": "clip_text"})
    save_pair(out_dir, flags, image_params, text_params, vocab, source)
    return ClipTowers(image, image_params, text, text_params, clip.resolve_clip_flags(dict(flags)),
                      os.path.join(out_dir, VOCAB_FILE))


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def load_pair(directory: str) -> ClipTowers:
    """Read a CLIP pair directory back.

    Raises:
      ValueError: a ``clip_pair.json`` of another kind, towers of the wrong kinds,
        or towers of different embedding widths (``n_embd``), checked before any
        parameters are read.
      FileNotFoundError: a missing tower directory or vocabulary.
    """
    pair = _read_json(os.path.join(directory, PAIR_FILE))
    if pair.get("kind") != PAIR_KIND:
        raise ValueError(f"{directory}/{PAIR_FILE} has kind {pair.get('kind')!r}, not {PAIR_KIND!r}")
    paths = {k: os.path.join(directory, pair[TOWER_DIRS[k]]) for k in TOWER_DIRS}
    configs = {}
    for kind, path in paths.items():
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"{directory}/{PAIR_FILE} names {path} as the {kind} tower, but it holds no "
                                    "config.json: convert the towers with python -m diffusion_jax.convert --preset=clip")
        configs[kind] = _read_json(os.path.join(path, "config.json"))
        if configs[kind]["kind"] != kind:
            raise ValueError(f"{path} holds a {configs[kind]['kind']!r} model, not the {kind} tower")
    widths = {k: int(c["model"]["n_embd"]) for k, c in configs.items()}
    if widths["clip_image"] != widths["clip_text"]:
        raise ValueError(f"the CLIP towers of {directory} embed into different widths (image n_embd="
                         f"{widths['clip_image']}, text n_embd={widths['clip_text']}): pair towers of one CLIP model")
    vocab = os.path.join(directory, pair["vocab"])
    if not os.path.isfile(vocab):
        raise FileNotFoundError(f"{directory}/{PAIR_FILE} names the vocabulary {vocab}, which does not exist: copy "
                                f"CLIP's {VOCAB_FILE} there")
    image, image_params, _ = load_converted(paths["clip_image"])
    text, text_params, _ = load_converted(paths["clip_text"])
    return ClipTowers(image, image_params, text, text_params, clip.resolve_clip_flags(pair["clip"]), vocab)
