"""Captions for GLIDE-style text models: tokenizers, the null caption, batches of tokens.

Orchestration glue shared by training (`train_lib`, `train_steps`,
`train_samples`) and sampling (`sample_text`):

* `make_tokenizer(name, encoder_json=..., vocab_bpe=...)`: "byte"
  (`text.ByteTokenizer`, for models trained from scratch) or "glide" (GPT-2's
  BPE from local files, for OpenAI's GLIDE checkpoints);
  `tokenizer_from_config(config)` reads `config.text`.
* `null_caption(tokenizer, text_ctx)`: the empty caption, one row
  `{"tokens": [L] all end tokens, "mask": [L] all False}`: what caption dropout
  trains on and what `guidance.classifier_free` gets as `null_label`.
* `caption_batch(tokenizer, captions, text_ctx)`: host-side
  `{"tokens": int32 [B, L], "mask": bool [B, L]}`.
"""

from __future__ import annotations

import os

import numpy as np

from diffusion_jax import text

TOKENIZERS = ("byte", "glide")
# GLIDE's upsampler turns 64 px into 256 px: the low-resolution input is 1/4 the size.
LOW_RES_FACTOR = 4
TOKENIZER_FILES = ("encoder.json", "vocab.bpe")


def make_tokenizer(name: str, *, encoder_json: str | None = None, vocab_bpe: str | None = None):
    """A tokenizer by name: "byte" (no files) or "glide" (GPT-2 BPE from `encoder_json` + `vocab_bpe`).

    Raises:
      ValueError: an unknown name, or "glide" without both paths.
      FileNotFoundError: GLIDE files that do not exist (the message says where they come from).
    """
    if name == "byte":
        return text.ByteTokenizer()
    if name != "glide":
        raise ValueError(f"unknown tokenizer {name!r}; accepted: {TOKENIZERS}")
    if not encoder_json or not vocab_bpe:
        raise ValueError("the 'glide' tokenizer needs the paths of encoder.json and vocab.bpe "
                         "(config.text.encoder_json / config.text.vocab_bpe, or sample.py --tokenizer_dir)")
    return text.load_glide_tokenizer(encoder_json, vocab_bpe)


def tokenizer_files(directory: str) -> tuple[str, str]:
    """(encoder.json, vocab.bpe) paths in `directory` (`.gz` copies accepted).

    Raises:
      FileNotFoundError: naming the missing files and where they come from.
    """
    found, missing = [], []
    for name in TOKENIZER_FILES:
        candidates = [os.path.join(directory, name), os.path.join(directory, name + ".gz")]
        path = next((p for p in candidates if os.path.isfile(p)), None)
        found.append(path)
        if path is None:
            missing.append(name)
    if missing:
        raise FileNotFoundError(
            f"--tokenizer_dir={directory} lacks {' and '.join(missing)} (or .gz copies). {text._WHERE}")
    return found[0], found[1]


def tokenizer_from_config(config):
    """The tokenizer `config.text` names (a ConfigDict or a plain dict)."""
    t = config["text"]
    return make_tokenizer(t["tokenizer"], encoder_json=t.get("encoder_json"), vocab_bpe=t.get("vocab_bpe"))


def null_caption(tokenizer, text_ctx: int) -> dict[str, np.ndarray]:
    """The empty caption as one row: {"tokens": int32 [L] (end tokens), "mask": bool [L] (all False)}."""
    tokens, mask = tokenizer.tokenize_batch([""], text_ctx)
    return {"tokens": tokens[0], "mask": mask[0]}


def caption_batch(tokenizer, captions, text_ctx: int) -> dict[str, np.ndarray]:
    """Captions [B] -> {"tokens": int32 [B, L], "mask": bool [B, L]} (host NumPy)."""
    tokens, mask = tokenizer.tokenize_batch([str(c) for c in np.asarray(captions).reshape(-1)], text_ctx)
    return {"tokens": tokens, "mask": mask}



def clip_caption_tokens(tokenizer, captions, text_ctx: int) -> dict[str, np.ndarray]:
    """Captions [B] -> {"tokens": int32 [B, L], "lens": int32 [B]} for `ClipPair.encode_text`.

    `lens - 1` is the first end (padding) token after the caption, where the
    text tower reads its embedding as CLIP reads its end token; a caption that
    fills the context is read at its last token.
    """
    batch = caption_batch(tokenizer, captions, text_ctx)
    lens = np.minimum(batch["mask"].sum(axis=1) + 1, text_ctx).astype(np.int32)
    return {"tokens": batch["tokens"], "lens": lens}

def quantize_8bit(x: np.ndarray) -> np.ndarray:
    """[-1, 1] floats rounded to the uint8 grid, as GLIDE's notebook does before upsampling."""
    return (np.round((np.asarray(x, np.float32) + 1) * 127.5).clip(0, 255) / 127.5 - 1).astype(np.float32)


def low_res_of(images: np.ndarray, factor: int = LOW_RES_FACTOR) -> np.ndarray:
    """Area-downsampled [B, H/f, W/f, C] copies of float images [B, H, W, C] (the upsampler's input),
    on the uint8 grid like the base model's quantised samples."""
    b, h, w, c = images.shape
    if h % factor or w % factor:
        raise ValueError(f"images of {h}x{w} px cannot be downsampled by {factor}")
    small = images.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))
    return quantize_8bit(small)


def check_tokenizer_fits(tokenizer, n_vocab: int) -> None:
    """The model's embedding table must cover every id the tokenizer emits."""
    if tokenizer.n_vocab > n_vocab:
        raise ValueError(f"the tokenizer emits {tokenizer.n_vocab} ids but the model's n_vocab is {n_vocab}; "
                         f"set config.model.n_vocab to at least {tokenizer.n_vocab}")


def text_model_fn(module, params, tokens, mask, *, null: dict | None = None, cfg_scale: float | None = None,
                  **fixed):
    """(model_fn, y) for sampling a GLIDE model on a caption batch, guided or not.

    The captions (and the empty caption) are encoded here, once per batch,
    outside the sampling loop; `y = {"text": TextEncoding}` is what to pass to
    the loop. With `cfg_scale`, the model function is
    `guidance.classifier_free(..., null_label={"text": <empty caption's encoding>})`:
    eps channels guided, variance from the conditional half.

    Args:
      module, params: a GLIDE network and its params.
      tokens, mask: [B, L] caption batch.
      null: the empty caption row (`null_caption`); required with `cfg_scale`.
      cfg_scale: classifier-free guidance scale; None samples the conditional model.
      **fixed: per-image inputs (`low_res`, ...) with batch B.
    """
    import jax

    from diffusion_jax import guidance
    from diffusion_jax.models.glide import glide_model_fn

    def encode(tok, msk):
        return module.apply({"params": params}, tok, msk, method="encode_text")

    fn = glide_model_fn(module, params, **fixed)
    y = {"text": encode(tokens, mask)}
    if cfg_scale is None:
        return fn, y
    if null is None:
        raise ValueError("classifier-free guidance needs the empty caption (null=null_caption(...))")
    null_enc = encode(null["tokens"][None], null["mask"][None])
    null_row = {"text": jax.tree.map(lambda a: a[0], null_enc)}
    return guidance.classifier_free(fn, cfg_scale, null_label=null_row), y
