"""The released improved-diffusion (march 2021) and guided-diffusion (july 2021) checkpoints by name.

``PRESETS[name]`` holds the repository, the kind and the flag string of the
README that trained the checkpoint ``name.pt``; ``resolve_preset(name)``
resolves them (``openai_flags.resolve_flags``).
"""

from __future__ import annotations

from diffusion_jax.convert.openai_flags import parse_flag_string, resolve_flags


def _p(repo, flags, kind="unet"):
    return {"repo": repo, "kind": kind, "flags": flags}


_ID_C10 = "--image_size 32 --num_channels 128 --num_res_blocks 3 --learn_sigma True --dropout 0.3"
_ID_I64 = "--image_size 64 --num_channels 128 --num_res_blocks 3 --learn_sigma True"
_ID_COS4K = " --diffusion_steps 4000 --noise_schedule cosine"
_ID_NORESCALE = " --rescale_learned_sigmas False --rescale_timesteps False"
_ID_LSUN = (
    "--image_size 256 --num_channels 128 --num_res_blocks 2 --num_heads 1 --learn_sigma True"
    " --use_scale_shift_norm False --attention_resolutions 16"
    " --diffusion_steps 1000 --noise_schedule linear" + _ID_NORESCALE
)
_GD = " --diffusion_steps 1000 --learn_sigma True --resblock_updown True --use_scale_shift_norm True"
_GD_256 = (
    "--attention_resolutions 32,16,8 --image_size 256 --noise_schedule linear --num_channels 256"
    " --num_head_channels 64 --num_res_blocks 2 --use_fp16 True" + _GD
)
_GD_LSUN = _GD_256 + " --class_cond False --dropout 0.1"
# The classifiers' training schedule is not documented; we record the schedule
# of the diffusion model each one guides (it only matters for training).
_GD_CLS = " --diffusion_steps 1000 --noise_schedule linear"

# Every released improved-diffusion (march-2021) and guided-diffusion (jul-2021)
# checkpoint, by file stem, with its README flags.
PRESETS: dict[str, dict] = {
    "imagenet64_uncond_100M_1500K": _p("improved", _ID_I64 + _ID_COS4K),
    "cifar10_uncond_50M_500K": _p("improved", _ID_C10 + _ID_COS4K),
    "imagenet64_cond_270M_250K": _p(
        "improved",
        "--image_size 64 --num_channels 192 --num_res_blocks 3 --learn_sigma True --class_cond True"
        + _ID_COS4K
        + _ID_NORESCALE,
    ),
    "upsample_cond_500K": _p(
        "improved",
        "--large_size 256 --small_size 64 --num_channels 192 --num_res_blocks 2 --learn_sigma True"
        " --class_cond True --diffusion_steps 4000 --noise_schedule linear"
        + _ID_NORESCALE,
        "super_res",
    ),
    "lsun_uncond_100M_1200K_bs128": _p("improved", _ID_LSUN),
    "lsun_uncond_100M_2400K_bs64": _p("improved", _ID_LSUN),
    "imagenet64_uncond_vlb_100M_1500K": _p(
        "improved", _ID_I64 + _ID_COS4K + " --use_kl True"
    ),
    "cifar10_uncond_vlb_50M_500K": _p(
        "improved", _ID_C10 + _ID_COS4K + " --use_kl True"
    ),
    "64x64_diffusion": _p(
        "guided",
        "--attention_resolutions 32,16,8 --class_cond True --dropout 0.1 --image_size 64"
        " --noise_schedule cosine --num_channels 192 --num_head_channels 64 --num_res_blocks 3"
        " --use_new_attention_order True --use_fp16 True" + _GD,
    ),
    "128x128_diffusion": _p(
        "guided",
        "--attention_resolutions 32,16,8 --class_cond True --image_size 128 --noise_schedule linear"
        " --num_channels 256 --num_heads 4 --num_res_blocks 2 --use_fp16 True" + _GD,
    ),
    "256x256_diffusion": _p("guided", _GD_256 + " --class_cond True"),
    "256x256_diffusion_uncond": _p("guided", _GD_256 + " --class_cond False"),
    "512x512_diffusion": _p(
        "guided",
        _GD_256.replace("256 --noise", "512 --noise").replace(
            "--use_fp16 True", "--use_fp16 False"
        )
        + " --class_cond True",
    ),
    "64_256_upsampler": _p(
        "guided",
        "--attention_resolutions 32,16,8 --class_cond True --large_size 256 --small_size 64"
        " --noise_schedule linear --num_channels 192 --num_heads 4 --num_res_blocks 2 --use_fp16 True"
        + _GD,
        "super_res",
    ),
    "128_512_upsampler": _p(
        "guided",
        "--attention_resolutions 32,16 --class_cond True --large_size 512 --small_size 128"
        " --noise_schedule linear --num_channels 192 --num_head_channels 64 --num_res_blocks 2"
        " --use_fp16 True" + _GD,
        "super_res",
    ),
    "lsun_bedroom": _p("guided", _GD_LSUN),
    "lsun_cat": _p("guided", _GD_LSUN),
    "lsun_horse": _p("guided", _GD_LSUN),
    "lsun_horse_nodropout": _p(
        "guided", _GD_LSUN.replace("--dropout 0.1", "--dropout 0.0")
    ),
    "64x64_classifier": _p(
        "guided",
        "--image_size 64 --classifier_depth 4 --diffusion_steps 1000 --noise_schedule cosine",
        "classifier",
    ),
    "128x128_classifier": _p("guided", "--image_size 128" + _GD_CLS, "classifier"),
    "256x256_classifier": _p("guided", "--image_size 256" + _GD_CLS, "classifier"),
    "512x512_classifier": _p("guided", "--image_size 512" + _GD_CLS, "classifier"),
}


def resolve_preset(name: str) -> dict:
    """``resolve_flags`` for a released checkpoint by name (see ``PRESETS``).

    Returns:
      ``{"kind", "model": <module kwargs>, "diffusion": {...}}``.

    Raises:
      ValueError: an unknown name (the message lists the known ones).
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    p = PRESETS[name]
    flags = dict(parse_flag_string(p["flags"]), kind=p["kind"])
    return resolve_flags(flags, p["repo"])
