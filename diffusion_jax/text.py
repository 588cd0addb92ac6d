"""Caption tokenizers for GLIDE-style text conditioning.

``load_glide_tokenizer(encoder_json, vocab_bpe)`` reproduces glide-text2im's
``tokenizer.bpe.get_encoder()`` (GPT-2's byte-level BPE, 50257 ids) exactly:

* ``encode`` lower-cases the text (``str.lower()``, GLIDE's only normalisation:
  no ftfy, no whitespace clean-up), splits it with GPT-2's regex and applies
  the BPE merges. ``<|endoftext|>`` in the text is encoded as ordinary text.
* ``end_token`` is ``n_vocab - 1`` (50256, ``<|endoftext|>``), also the padding id.
* ``padded_tokens_and_mask`` truncates to ``text_ctx`` and pads with
  ``end_token``; the mask is False on padding.

The BPE itself runs in ``tiktoken`` (an ``Encoding`` built from the local files;
nothing is downloaded). ``ByteTokenizer`` is a vocabulary-free fallback for
models trained from scratch (ids = UTF-8 bytes, 256 = end/padding).

``load_clip_tokenizer(bpe_path)`` (re-exported from ``diffusion_jax.clip_tokenizer``)
is CLIP's tokenizer, which GLIDE's noised CLIP reads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence

import numpy as np

# DESIGN.md §6: CLIP's tokenizer (GLIDE's noised CLIP) lives in its own module.
from diffusion_jax.bpe import bytes_to_unicode, read_text
from diffusion_jax.clip_tokenizer import ClipTokenizer, load_clip_tokenizer  # noqa: F401

# DESIGN.md §4 lists `classifier_cond_fn` under `diffusion_jax.text`; it lives
# with the other guidance transforms and is re-exported here for that contract.
from diffusion_jax.guidance import classifier_cond_fn  # noqa: F401

# GPT-2's pre-tokenizer (openai/gpt-2 encoder.py; glide_text2im/tokenizer/bpe.py).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

_WHERE = (
    "GLIDE's tokenizer files are GPT-2's BPE vocabulary; glide-text2im ships them as "
    "glide_text2im/tokenizer/encoder.json.gz and glide_text2im/tokenizer/vocab.bpe.gz "
    "(GPT-2 publishes the same files as encoder.json and vocab.bpe). "
    "Copy them locally and pass their paths; nothing is downloaded."
)


class _Padding:
    """``padded_tokens_and_mask`` and batching, shared by every tokenizer here."""

    end_token: int

    def padded_tokens_and_mask(self, ids: Sequence[int], text_ctx: int) -> tuple[list[int], list[bool]]:
        """GLIDE's ``padded_tokens_and_mask``: truncate to ``text_ctx``, pad with ``end_token``.

        Returns:
          (tokens, mask): two lists of length ``text_ctx``; mask is True on the
          kept ids and False on padding. ``ids=[]`` gives the empty caption
          (classifier-free guidance's unconditional row).
        """
        if text_ctx < 1:
            raise ValueError(f"text_ctx must be positive, got {text_ctx}")
        ids = [int(i) for i in ids][:text_ctx]
        pad = text_ctx - len(ids)
        return ids + [self.end_token] * pad, [True] * len(ids) + [False] * pad

    def tokenize_batch(self, captions: Iterable[str], text_ctx: int) -> tuple[np.ndarray, np.ndarray]:
        """Captions -> (tokens int32 [B, text_ctx], mask bool [B, text_ctx]); "" is the empty caption."""
        rows = [self.padded_tokens_and_mask(self.encode(c) if c else [], text_ctx) for c in captions]
        tokens = np.array([r[0] for r in rows], np.int32).reshape(-1, text_ctx)
        mask = np.array([r[1] for r in rows], bool).reshape(-1, text_ctx)
        return tokens, mask


class GlideTokenizer(_Padding):
    """glide-text2im's BPE ``Encoder`` on top of a ``tiktoken.Encoding``.

    Attributes:
      n_vocab: ``len(encoder.json)`` (50257 for GLIDE).
      end_token: ``n_vocab - 1``; GLIDE pads with it.
    """

    def __init__(self, encoding, n_vocab: int):
        self._enc = encoding
        self.n_vocab = n_vocab
        self.end_token = n_vocab - 1

    def encode(self, text: str) -> list[int]:
        """Lower-case, pre-tokenize with GPT-2's regex, BPE; special tokens are plain text."""
        return self._enc.encode_ordinary(text.lower())

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text (invalid UTF-8 replaced by U+FFFD, as GLIDE's ``errors="replace"``)."""
        return self._enc.decode([int(i) for i in ids], errors="replace")


def _mergeable_ranks(encoder: dict[str, int], merges: list[tuple[str, ...]], where: str) -> tuple[dict, dict]:
    """(mergeable_ranks {bytes: id}, special_tokens {str: id}) from GPT-2-format vocabulary data.

    GPT-2's BPE merges pairs in merge-list order; tiktoken merges by the
    rank of the merged bytes. They agree when every token's id is its rank:
    the 256 bytes first (in ``bytes_to_unicode`` order), then one id per merge.
    """
    byte_of = {c: b for b, c in bytes_to_unicode().items()}

    def to_bytes(s: str) -> bytes:
        try:
            return bytes(byte_of[c] for c in s)
        except KeyError as e:
            raise ValueError(f"{where}: {s!r} holds {e.args[0]!r}, not a GPT-2 byte character") from None

    ranks = {bytes([b]): i for i, b in enumerate(bytes_to_unicode())}
    for pair in merges:
        if len(pair) != 2:
            raise ValueError(f"{where}: merge line {' '.join(pair)!r} is not a pair")
        ranks.setdefault(to_bytes(pair[0]) + to_bytes(pair[1]), len(ranks))
    specials, wrong = {}, []
    for token, idx in encoder.items():
        if all(c in byte_of for c in token) and to_bytes(token) in ranks:
            if ranks[to_bytes(token)] != idx:
                wrong.append((token, idx, ranks[to_bytes(token)]))
        else:
            specials[token] = int(idx)
    missing = len(ranks) - (len(encoder) - len(specials))
    if wrong or missing:
        raise ValueError(
            f"{where}: encoder.json does not match vocab.bpe as GPT-2's files do (ids must be the 256 bytes, "
            f"then one id per merge in order): {len(wrong)} ids differ (e.g. {wrong[:3]}), "
            f"{missing} merged tokens are missing from encoder.json")
    return ranks, specials


def load_glide_tokenizer(encoder_json: str | os.PathLike, vocab_bpe: str | os.PathLike) -> GlideTokenizer:
    """GLIDE's tokenizer from local ``encoder.json`` and ``vocab.bpe`` (``.gz`` accepted).

    Raises:
      FileNotFoundError: naming the missing files and where they come from.
      ValueError: files that are not a consistent GPT-2-format vocabulary.
    """
    import tiktoken

    paths = {"encoder.json": os.fspath(encoder_json), "vocab.bpe": os.fspath(vocab_bpe)}
    missing = [f"{name} ({p})" for name, p in paths.items() if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"missing GLIDE tokenizer file(s): {', '.join(missing)}. {_WHERE}")
    encoder = json.loads(read_text(paths["encoder.json"]))
    # GLIDE drops the first line (the "#version" header) and the last (empty after the final newline).
    merges = [tuple(line.split()) for line in read_text(paths["vocab.bpe"]).split("\n")[1:-1]]
    ranks, specials = _mergeable_ranks(encoder, merges, where=paths["encoder.json"])
    encoding = tiktoken.Encoding(
        name=f"glide_bpe_{len(encoder)}", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=specials
    )
    return GlideTokenizer(encoding, n_vocab=len(encoder))


class ByteTokenizer(_Padding):
    """Vocabulary-free tokenizer for models trained from scratch (e.g. captioned digits).

    ids are the UTF-8 bytes of the (optionally lower-cased) text; 256 is the
    end/padding token, so ``n_vocab`` is 257. ``decode`` drops end tokens.
    """

    n_vocab = 257
    end_token = 256

    def __init__(self, lower: bool = False):
        self.lower = lower

    def encode(self, text: str) -> list[int]:
        return list((text.lower() if self.lower else text).encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids if int(i) != self.end_token).decode("utf-8", errors="replace")
