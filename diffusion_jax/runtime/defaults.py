"""Defaults of every config field the programs read: the one place a field gets its default.

`get_config()` is the base config (configs/default.py re-exports it; variants
under configs/ import it and override fields); `runtime.config_io` merges a
stored `config.json` onto it. It lives in the package, not in configs/,
because configs/ is not installed with the library and sampling, evaluation
and conversion must read work directories from an installed package.

Key names match constructor fields exactly (`UNet(**config.model)`), so an
unknown key fails loudly. Override any field from the command line, e.g.
`python train.py --config=configs/cifar10.py --config.train.batch_size=256`.
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.seed = 0  # Everything random is a function of (seed, step) or (seed, index).
    c.kind = "unet"  # Model kind: a key of diffusion_jax.convert.kinds.KINDS ("unet", "super_res", "classifier", "glide", ...);
    # GLIDE kinds take `glide_model()` below as their model group.

    # ---- model: fields of diffusion_jax.models.UNet (or EncoderUNet for classifiers).
    c.model = ml_collections.ConfigDict(dict(
        image_size=32,  # Must equal data.image_size.
        in_channels=3,  # Image channels.
        model_channels=128,  # Base width; the timestep embedding is 4x this.
        out_channels=6,  # 2 * in_channels with learned variances (eps, then v).
        num_res_blocks=2,  # Residual blocks per resolution (the up path has one more).
        attention_resolutions=(2, 4),  # Downsample factors with self-attention (32px: 16 and 8 px).
        dropout=0.0,  # Dropout inside residual blocks.
        channel_mult=(1, 2, 2, 2),  # Width multiplier per resolution.
        num_classes=None,  # int for a class-conditional model.
        null_label=False,  # One extra label row (index num_classes) for classifier-free guidance.
        use_checkpoint=False,  # Rematerialise blocks in the backward pass (saves memory).
        num_heads=4,  # Attention heads ...
        num_head_channels=-1,  # ... or, when not -1, channels per head (overrides num_heads).
        num_heads_upsample=-1,  # Heads on the up path; -1 = num_heads.
        use_scale_shift_norm=True,  # AdaGN: norm(h) * (1 + scale) + shift.
        resblock_updown=False,  # BigGAN-style residual up/down sampling.
        use_new_attention_order=False,  # Split q, k, v before heads (guided-diffusion 64x64).
        dtype="float32",  # Compute dtype: "float32" | "bfloat16" (params stay float32).
    ))

    # ---- diffusion process and objective.
    c.diffusion = ml_collections.ConfigDict(dict(
        noise_schedule="cosine",  # "linear" | "cosine".
        diffusion_steps=1000,  # T.
        timestep_respacing="",  # Respacing used for training ("" = all T steps).
        rescale_timesteps=False,  # Feed the network t * 1000 / T (improved-diffusion's default).
        mean_type="epsilon",  # "epsilon" | "start_x" | "previous_x" | "v" (v = alpha eps - sigma x0, Salimans & Ho 2022).
        var_type="learned_range",  # "fixed_small" | "fixed_large" | "learned" | "learned_range".
        loss_type="rescaled_mse",  # "mse" | "rescaled_mse" (L_hybrid, lambda = 1e-3) | "kl" | "rescaled_kl" (L_vlb).
        schedule_sampler="uniform",  # "uniform" | "loss-second-moment" (importance-sampled t).
        snr_gamma=0.0,  # Min-SNR-gamma weighting of the MSE term (Hang et al. 2023; 5 is typical); 0 = off (OpenAI's loss).
    ))

    # ---- data.
    c.data = ml_collections.ConfigDict(dict(
        name="digits",  # "digits" | "folder:/path/to/images" | any prepared TFDS name.
        data_dir=ml_collections.config_dict.placeholder(str),  # TFDS data dir (None: TFDS default).
        train_split="train",  # Split to train on.
        eval_split="test",  # Split for validation / bits-per-dim.
        image_size=32,  # Images are resized to this.
        channels=3,  # Image channels the model expects.
        random_flip=False,  # Random horizontal flips (never for digits).
        worker_count=0,  # grain worker processes (0 = in-process).
    ))

    # ---- optimizer (optax AdamW).
    c.optim = ml_collections.ConfigDict(dict(
        lr=1e-4,  # Peak learning rate.
        weight_decay=0.0,  # Decoupled weight decay.
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        warmup_steps=0,  # Linear warm-up from 0.
        anneal=False,  # Linear anneal to 0 at train.num_steps (OpenAI's lr_anneal_steps).
        grad_clip=0.0,  # Global-norm clipping; 0 disables.
    ))

    # ---- training loop.
    c.train = ml_collections.ConfigDict(dict(
        batch_size=128,  # Global batch over all devices and hosts.
        microbatches=1,  # Gradient accumulation: the batch is split into this many averaged chunks.
        num_steps=500_000,  # Optimizer steps.
        ema_rates=(0.9999,),  # One EMA of the params per rate.
        ema_warmup=False,  # EMA rate min(rate, (1 + step) / (10 + step)); OpenAI uses none.
        p_uncond=0.0,  # Null-label dropout probability (classifier-free guidance); needs model.null_label.
        log_every=100,  # Steps between metric lines.
        checkpoint_every=10_000,  # Steps between checkpoints (also at the end and on SIGTERM).
        keep_checkpoints=3,  # Checkpoints kept.
        sample_every=10_000,  # Steps between EMA sample grids (0: only at the end).
        eval_every=0,  # Steps between test-split bits/dim estimates (0: never).
        eval_examples=256,  # Test examples per bits/dim estimate.
        eval_timesteps=8,  # Importance-sampled timesteps per example for the estimate.
    ))

    # ---- device layout: data parallel over every device, optionally fully sharded (FSDP).
    c.parallel = ml_collections.ConfigDict(dict(
        fsdp=1,  # Mesh ('data', 'fsdp') = (devices / fsdp, fsdp): params, Adam moments and EMAs split fsdp ways.
        fsdp_min_size=4096,  # Leaves with fewer elements stay replicated (biases, norms).
    ))

    # ---- captions (GLIDE kinds only; other kinds ignore this group).
    c.text = ml_collections.ConfigDict(dict(
        tokenizer="byte",  # "byte" (UTF-8 bytes, 257 ids; models trained from scratch) | "glide" (GPT-2 BPE).
        encoder_json=ml_collections.config_dict.placeholder(str),  # "glide": path of encoder.json(.gz).
        vocab_bpe=ml_collections.config_dict.placeholder(str),  # "glide": path of vocab.bpe(.gz).
        text_ctx=128,  # Tokens per caption (truncated / padded); must equal model.text_ctx.
        # Training grids: one row per prompt (train.p_uncond is the empty-caption dropout rate).
        grid_prompts=("a photo of a cat", "a painting of a fox", "an oil painting of a corgi"),
    ))

    # ---- sample grids written during training (sample.py has its own flags).
    c.sample = ml_collections.ConfigDict(dict(
        num_per_class=8,  # Grid: this many samples for each class (or 64 in all when unconditional).
        timestep_respacing="100",  # Respaced chain for grids.
        use_ddim=False,
        cfg_scale=0.0,  # Classifier-free guidance scale for grids (0: plain conditional).
    ))

    # ---- progressive distillation (Salimans & Ho 2022; training/distill.py, configs/digits_distill.py).
    # A student stage: diffusion.timestep_respacing="distillN", mean_type="v", fixed variance; it learns one DDIM
    # step per two of the teacher's on "distill{teacher_steps}" and starts from the teacher's weights.
    c.distill = ml_collections.ConfigDict(dict(
        teacher_workdir=ml_collections.config_dict.placeholder(str),  # None: not a distillation run.
        teacher_steps=0,  # The teacher's grid, 2N for a student on N steps.
        teacher_mean_type="epsilon",  # The teacher's parameterisation (checked against its config.json).
        teacher_ema_rate=ml_collections.config_dict.placeholder(float),  # None: its first EMA; 0: raw params.
        clip_denoised=True,  # Clip the teacher's x0 to [-1, 1] in its DDIM steps (its sampler's default).
    ))
    return c


def glide_model(**overrides):
    """The model group of GLIDE kinds: fields of `models.glide.Text2ImUNet`, GLIDE's base defaults.

    Replaces `c.model` (which holds U-Net fields) in configs with a GLIDE `kind`.
    """
    m = ml_collections.ConfigDict(dict(
        image_size=64,  # Must equal data.image_size.
        in_channels=3,  # Trunk input width: 3 (glide), 6 (glide_upsample: x + upsampled low-res).
        model_channels=192,  # Base width; timestep embedding and caption projection are 4x this.
        out_channels=6,  # eps then learned-range variance values (always learned sigma in GLIDE).
        num_res_blocks=3,
        attention_resolutions=(2, 4, 8),  # Downsample factors with (text) attention.
        dropout=0.1,
        channel_mult=(1, 2, 3, 4),
        use_checkpoint=False,  # Rematerialise blocks in the backward pass.
        num_heads=1,
        num_head_channels=64,  # Channels per attention head (overrides num_heads when not -1).
        num_heads_upsample=-1,
        use_scale_shift_norm=True,
        resblock_updown=True,
        text_ctx=128,  # Caption length in tokens; must equal text.text_ctx.
        xf_width=512,  # Text transformer width (0: no text path).
        xf_layers=16,  # Text transformer depth.
        xf_heads=8,
        xf_final_ln=True,
        xf_padding=True,  # Learned padding embedding added where the mask is False.
        n_vocab=50257,  # Token ids the embedding covers (257 with the byte tokenizer).
        dtype="float32",  # Compute dtype: "float32" | "bfloat16".
    ))
    m.update(overrides)
    return m
