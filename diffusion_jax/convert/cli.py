"""``python -m diffusion_jax.convert``: an OpenAI checkpoint -> a converted directory (see the package docstring)."""

from __future__ import annotations

import argparse
import os

import jax
import numpy as np

from diffusion_jax.convert import clip_towers, glide, openai_flags, presets
from diffusion_jax.convert.api import convert_state_dict, save_converted
from diffusion_jax.convert.state_dict import load_state_dict


def resolve_cli(preset: str | None, flags: str | None, repo: str) -> tuple[dict, dict]:
    """``(cfg, source)`` for a released checkpoint's ``preset`` name or an OpenAI ``flags`` string.

    ``repo``: whose names and defaults ``flags`` use ("improved", "guided", or
    "glide" for glide-text2im's ``model_creation`` names). ``source`` records
    what the settings came from (stored in ``config.json``).
    """
    if preset in glide.GLIDE_PRESETS:
        return glide.resolve_glide_preset(preset), {"repo": "glide", "preset": preset}
    if preset:
        p = presets.PRESETS[preset]
        return presets.resolve_preset(preset), {"flags": p["flags"], "repo": p["repo"], "preset": preset}
    if repo == "glide":
        return glide.resolve_glide_flags(openai_flags.parse_flag_string(flags)), {"flags": flags, "repo": "glide"}
    return openai_flags.parse_openai_flags(flags, repo), {"flags": flags, "repo": repo}


def check_out_dir(out: str, overwrite: bool) -> None:
    """Refuse ``--out`` when it is a file, or a non-empty directory that is not a converted one (no
    ``params.safetensors``, e.g. a training workdir whose config.json would be replaced), unless ``overwrite``.
    """
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out={out} is a file; pass a directory")
    names = sorted(os.listdir(out)) if os.path.isdir(out) else []
    converted = "params.safetensors" in names or clip_towers.PAIR_FILE in names
    if names and not converted and not overwrite:
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise ValueError(f"--out={out} is a non-empty directory that is not a converted checkpoint (it holds "
                         f"{shown}); nothing was written. Pass an empty or new --out, or --overwrite to write "
                         "config.json and params.safetensors into it anyway")


def main(argv=None) -> None:
    """Parse the command line, convert, write ``--out``."""
    ap = argparse.ArgumentParser(prog="python -m diffusion_jax.convert",
                                 description="Import an OpenAI checkpoint into a converted directory.")
    ap.add_argument("--checkpoint", required=True, help="model .pt / .npz / .safetensors")
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--preset", choices=sorted(presets.PRESETS) + sorted(glide.GLIDE_PRESETS) + ["clip"],
                       help="a released checkpoint's name (GLIDE: base, upsample, base-inpaint, upsample-inpaint; "
                            "clip: GLIDE's noised CLIP, both towers)")
    group.add_argument("--flags", help='OpenAI flag string, e.g. "--image_size 64 --num_channels 192"')
    ap.add_argument("--repo", choices=(*openai_flags.REPOS, "glide", "clip"), default="guided",
                    help="whose defaults --flags uses (glide: glide-text2im's model_creation names; clip: its "
                         "clip/config.yaml names, for a CLIP pair)")
    ap.add_argument("--text_checkpoint", help="CLIP pair: the text tower (clip/text-enc); --checkpoint is the image "
                                              "tower (clip/image-enc)")
    ap.add_argument("--clip_vocab", help=f"CLIP pair: CLIP's {clip_towers.VOCAB_FILE}, copied into --out")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--overwrite", action="store_true",
                    help="write into a non-empty --out that is not a converted directory (replaces its config.json)")
    ap.add_argument("--verbosity", type=int, default=None, help="1: INFO logs and tracebacks of user errors")
    args = ap.parse_args(argv)
    check_out_dir(args.out, args.overwrite)
    if args.preset == "clip" or (args.flags is not None and args.repo == "clip"):
        return _convert_clip_pair(args)
    if args.text_checkpoint or args.clip_vocab:
        raise ValueError("--text_checkpoint and --clip_vocab convert GLIDE's noised CLIP: pass --preset=clip "
                         "(or --repo=clip --flags=...)")
    cfg, source = resolve_cli(args.preset, args.flags, args.repo)
    source = {"checkpoint": args.checkpoint, **source}
    _, params = convert_state_dict(cfg, load_state_dict(args.checkpoint))
    save_converted(args.out, cfg, params, source)
    n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))
    print(f"wrote {args.out}/config.json and params.safetensors ({cfg['kind']}, {n:,} parameters)")


def _convert_clip_pair(args) -> None:
    """Both noised-CLIP towers and the vocabulary -> a CLIP pair directory (``convert.clip_towers``)."""
    if not args.text_checkpoint or not args.clip_vocab:
        raise ValueError(f"a CLIP pair needs --checkpoint (image tower), --text_checkpoint (text tower) and "
                         f"--clip_vocab ({clip_towers.VOCAB_FILE})")
    flags = openai_flags.parse_flag_string(args.flags) if args.flags else {}
    source = {"checkpoint": args.checkpoint, "text_checkpoint": args.text_checkpoint, "repo": "clip",
              **({"flags": args.flags} if args.flags else {"preset": "clip"})}
    pair = clip_towers.convert_pair(args.checkpoint, args.text_checkpoint, flags, args.clip_vocab, args.out, source)
    n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves((pair.image_params, pair.text_params)))
    print(f"wrote the CLIP pair directory {args.out} ({clip_towers.PAIR_FILE}, image/, text/, "
          f"{clip_towers.VOCAB_FILE}; {n:,} parameters)")


if __name__ == "__main__":
    main()
