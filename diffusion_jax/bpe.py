"""What GPT-2's and CLIP's byte-level BPE tokenizers share: the byte alphabet and reading vocabulary files.

Both ``text.GlideTokenizer`` (GPT-2's ``encoder.json`` + ``vocab.bpe``) and
``clip_tokenizer.ClipTokenizer`` (``bpe_simple_vocab_16e6.txt.gz``) spell
bytes with ``bytes_to_unicode``'s printable characters (Radford et al. 2019,
GPT-2, section 2.2: BPE over bytes, with merges kept out of the control
characters).
"""

from __future__ import annotations

import functools
import gzip
import os


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (the vocabulary files' alphabet).

    Returns:
      ``{byte: character}`` for the 256 bytes: printable Latin-1 bytes map to
      themselves, the other 68 to ``chr(256 + i)`` in byte order.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def read_text(path: str | os.PathLike) -> str:
    """A vocabulary file as text: gzip-compressed (a ``.gz`` name or gzip's magic bytes) or plain UTF-8."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    if path.endswith(".gz") or data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return data.decode("utf-8")
