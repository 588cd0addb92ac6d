"""GLIDE parity: networks, text encoder, CFG model_fn, sampling chains, diffusion tables.

Fixtures: tests/data/parity/glide (outputs of OpenAI's glide-text2im on CPU,
NCHW). Tolerances from its README: text encoder 2e-5, network outputs 1e-4,
loops 1e-3 (relative for large values), respacing exact.
"""

import functools
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from diffusion_jax import convert, gaussian, guidance, sampling, schedules
from diffusion_jax.convert import glide as convert_glide
from diffusion_jax.models import glide

jax.config.update("jax_disable_most_optimizations", True)

DATA = os.path.join(os.path.dirname(__file__), "data", "parity", "glide")
NETS = ("t2i_pub", "sr_pub", "inp_pub")
EMB = {"mean_type": "epsilon", "var_type": "learned_range"}
KERNELS = ("cpu", "xla")  # both forms of GroupNorm / attention / upsample meet the same tolerances


def nhwc(a):
    """NCHW or [K, N, C, H, W] -> channels last."""
    return np.moveaxis(np.asarray(a), -3, -1)


@functools.cache
def meta(name):
    with open(os.path.join(DATA, f"unet_{name}.json")) as f:
        return json.load(f)


@functools.cache
def io(name):
    with np.load(os.path.join(DATA, f"unet_{name}_io.npz")) as z:
        return {k: z[k] for k in z.files}


@functools.cache
def diffusion_npz():
    with np.load(os.path.join(DATA, "diffusion.npz")) as z:
        return {k: z[k] for k in z.files}


@functools.cache
def net(name, source="npz"):
    path = os.path.join(DATA, f"unet_{name}_weights.npz" if source == "npz" else f"unet_{name}.pt")
    return convert_glide.from_openai_glide(path, meta(name)["create_model_kwargs"])


@functools.cache
def jitted_forward(name, kernels):
    module = net(name)[0].clone(kernels=kernels)

    def fwd(params, x, t, kwargs):
        return module.apply({"params": params}, x, t, **kwargs, capture_intermediates=True, mutable=["intermediates"])

    return jax.jit(fwd)


def text_kwargs(d, prefix=""):
    return {"tokens": d[prefix + "inputs/tokens"], "mask": d[prefix + "inputs/mask"]}


def assert_close(got, want, atol, rtol=0.0, what=""):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        raise AssertionError(f"{what}: shape {got.shape} != {want.shape}")
    np.testing.assert_allclose(got, want, atol=atol, rtol=rtol, err_msg=what)


# ----------------------------------------------------------------------------- networks
FORWARD_CASES = (
    ("t2i_pub", "forward", {}),
    ("sr_pub", "lowres4", {"low_res": "inputs/low_res_4px"}),
    ("sr_pub", "lowres8", {"low_res": "inputs/low_res_8px"}),
    ("inp_pub", "masked", {"inpaint_image": "inputs/inpaint_image", "inpaint_mask": "inputs/inpaint_mask"}),
    ("inp_pub", "defaults", {}),
)


class ForwardParityTest(parameterized.TestCase):

    @parameterized.named_parameters(*[(f"{n}_{c}_{k}", n, c, e, k) for n, c, e in FORWARD_CASES for k in KERNELS])
    def test_forward(self, name, case, extra, kernels):
        d = io(name)
        module, params = net(name)
        kw = dict(text_kwargs(d), **{k: nhwc(d[v]) for k, v in extra.items()})
        out, state = jitted_forward(name, kernels)(params, nhwc(d["inputs/x"]), d["inputs/timesteps"], kw)
        assert_close(out, nhwc(d[f"{case}/out"]), 1e-4, what=f"{name}/{case}/out")
        self.assertEqual(out.dtype, jnp.float32)
        if f"{case}/trunk_input" in d:
            x = jnp.asarray(nhwc(d["inputs/x"]))
            trunk_in = module.apply(
                {"params": params}, x, kw.get("low_res"), kw.get("inpaint_image"), kw.get("inpaint_mask"),
                method=lambda m, *a: m._trunk_input(*a))
            assert_close(trunk_in, nhwc(d[f"{case}/trunk_input"]), 1e-6, what=f"{name}/{case}/trunk_input")
        if case in ("forward", "lowres4", "masked"):  # the features were recorded for the first case
            self._check_features(name, state["intermediates"])

    def _check_features(self, name, inter):
        d = io(name)
        assert_close(inter["time_embed_2"]["__call__"][0], d["features/time_embed"], 1e-4, what="time_embed")
        emb = inter["time_embed_2"]["__call__"][0] + inter["transformer_proj"]["__call__"][0]
        assert_close(emb, d["features/emb"], 1e-4, what="emb")
        for key in d:
            m = re.fullmatch(r"features/(.+)\.encoder_kv", key)
            if m:
                got = inter[m.group(1).replace(".", "_")]["encoder_kv"]["__call__"][0]
                assert_close(np.swapaxes(got, 1, 2), d[key], 2e-5, what=key)
            m = re.fullmatch(r"features/(.+)/channel_mean", key)
            if m:  # the block's output = its last sub-layer's output, first case only
                block = m.group(1).replace(".", "_")
                last = max((k for k in inter if k.startswith(block + "_") or k == block), key=lambda k: k)
                h = np.asarray(inter[last]["__call__"][0][0], np.float64)
                assert_close(h.mean(axis=(0, 1)), d[key][0], 1e-4, what=key)
                rms = np.sqrt(np.mean(h**2, axis=(0, 1)))
                assert_close(rms, d[key.replace("channel_mean", "channel_rms")][0], 1e-4, what=key)

    @parameterized.product(name=NETS, kernels=KERNELS)
    def test_text_encoder(self, name, kernels):
        d = io(name)
        module, params = net(name)
        module = module.clone(kernels=kernels)
        tokens, mask = d["inputs/tokens"], d["inputs/mask"]
        enc, state = module.apply({"params": params}, tokens, mask, method="encode_text",
                                  capture_intermediates=True, mutable=["intermediates"])
        inter = state["intermediates"]
        # Transformer input: embedding + position, padding slots replaced.
        xf_in = np.asarray(params["token_embedding"]["embedding"])[tokens] + np.asarray(params["positional_embedding"])
        xf_in = np.where(mask[..., None], xf_in, np.asarray(params["padding_embedding"])[None])
        assert_close(xf_in, d["text/xf_in"], 1e-6, what="xf_in")
        for key in d:
            m = re.fullmatch(r"text/resblocks\.(\d+)", key)
            if m:
                got = inter["transformer"][f"resblocks_{m.group(1)}"]["__call__"][0]
                assert_close(got, d[key], 2e-5, what=key)
        assert_close(inter["final_ln"]["__call__"][0], d["text/final_ln"], 2e-5, what="final_ln")
        assert_close(np.swapaxes(enc.xf_out, 1, 2), d["text/xf_out"], 2e-5, what="xf_out")
        assert_close(enc.xf_proj, d["text/xf_proj"], 2e-5, what="xf_proj")

    def test_bfloat16_and_remat(self):
        """bf16 compute keeps float32 params/output; use_checkpoint (remat) changes nothing."""
        d = io("inp_pub")
        module, params = net("inp_pub")
        args = (params, nhwc(d["inputs/x"]), d["inputs/timesteps"], text_kwargs(d))

        def run(m):
            return jax.jit(lambda p, x, t, kw: m.apply({"params": p}, x, t, **kw))(*args)

        ref = run(module)
        np.testing.assert_allclose(run(module.clone(use_checkpoint=True)), ref, atol=1e-6)
        low = run(module.clone(dtype="bfloat16"))
        self.assertEqual(low.dtype, jnp.float32)
        self.assertLess(float(jnp.max(jnp.abs(low - ref))), 0.05 * float(jnp.max(jnp.abs(ref))))

    def test_input_errors(self):
        d = io("inp_pub")
        module, params = net("inp_pub")
        x, t = nhwc(d["inputs/x"]), d["inputs/timesteps"]
        with self.assertRaisesRegex(ValueError, "low_res"):
            module.apply({"params": params}, x, t, low_res=x, **text_kwargs(d))
        with self.assertRaisesRegex(ValueError, "tokens"):
            module.apply({"params": params}, x, t)
        with self.assertRaisesRegex(ValueError, "text_ctx=8"):
            module.apply({"params": params}, x, t, tokens=d["inputs/tokens"][:, :5], mask=d["inputs/mask"][:, :5])


# ----------------------------------------------------------------------------- guidance and loops
def notebook_cfg_model_fn(model_fn, scale):
    """The text2im / inpaint notebooks' model_fn: guided eps for both halves, own variances."""

    def fn(x_t, ts, y):
        half = x_t[: len(x_t) // 2]
        out = model_fn(jnp.concatenate([half, half]), ts, y)
        eps, rest = out[..., :3], out[..., 3:]
        cond, uncond = jnp.split(eps, 2)
        half_eps = uncond + scale * (cond - uncond)
        return jnp.concatenate([jnp.concatenate([half_eps, half_eps]), rest], axis=-1)

    return fn


def empty_caption(text_ctx):
    return {"tokens": np.full((text_ctx,), 50256, np.int32), "mask": np.zeros((text_ctx,), bool)}


class GuidanceParityTest(parameterized.TestCase):

    @parameterized.parameters(*KERNELS)
    def test_cfg_model_fn(self, kernels):
        d = io("t2i_pub")
        module, params = net("t2i_pub")
        module = module.clone(kernels=kernels)
        p = "cfg_model_fn/inputs/"
        x, ts = nhwc(d[p + "x_t"]), d[p + "ts"]
        y = {"tokens": d[p + "tokens"], "mask": d[p + "mask"]}
        # One compiled network (batch 4) serves both guidance functions.
        base = jax.jit(glide.glide_model_fn(module, params))
        out = notebook_cfg_model_fn(base, 3.0)(x, ts, y)
        assert_close(out, nhwc(d["cfg_model_fn/out"]), 1e-4, what="cfg out")
        # guidance.classifier_free with the pytree null label gives the first half.
        b = len(x) // 2
        guided = guidance.classifier_free(base, 3.0, null_label=empty_caption(16))
        got = guided(x[:b], ts[:b], jax.tree.map(lambda a: a[:b], y))
        assert_close(got, nhwc(d["cfg_model_fn/out"])[:b], 1e-4, what="classifier_free")

    @parameterized.parameters(*KERNELS)
    def test_text2im_loop(self, kernels):
        """The text2im notebook's guided p_sample_loop, with the caption encoded once."""
        d, p = io("t2i_pub"), "loop0_p_sample_loop_text2im/"
        module, params = net("t2i_pub")
        module = module.clone(kernels=kernels)
        sched = convert_glide.make_glide_schedule("squaredcos_cap_v2", 1000, "10")
        np.testing.assert_array_equal(sched.timestep_map[::-1], d[p + "model_timesteps"][:, 0])
        encode = functools.partial(module.apply, {"params": params}, method="encode_text")
        null = empty_caption(16)
        y = {"text": encode(d[p + "inputs/tokens"][:1], d[p + "inputs/mask"][:1])}
        null_row = {"text": jax.tree.map(lambda a: a[0], encode(null["tokens"][None], null["mask"][None]))}
        model_fn = guidance.classifier_free(glide.glide_model_fn(module, params), 3.0, null_label=null_row)
        run = jax.jit(functools.partial(sampling.p_sample_loop_with_noise, model_fn, sched, return_trajectory=True,
                                        clip_denoised=True, **EMB))
        traj = run(nhwc(d[p + "inputs/x_T"])[:1], nhwc(d[p + "inputs/step_noise"])[:, :1], y=y)
        assert_close(traj.samples, nhwc(d[p + "samples"])[:, :1], 1e-3, 1e-3, what="samples")
        assert_close(traj.pred_xstart, nhwc(d[p + "pred_xstart"])[:, :1], 1e-3, 1e-3, what="pred_xstart")

    @parameterized.parameters(*KERNELS)
    def test_upsample_ddim_fast27_loop(self, kernels):
        """The upsampler cell: DDIM on fast27, low_res conditioning, no guidance."""
        d, p = io("sr_pub"), "loop0_ddim_sample_loop_text2im_upsample/"
        module, params = net("sr_pub")
        module = module.clone(kernels=kernels)
        sched = convert_glide.make_glide_schedule("linear", 1000, "fast27")
        np.testing.assert_array_equal(sched.timestep_map[::-1], d[p + "model_timesteps"][:, 0])
        model_fn = glide.glide_model_fn(module, params, low_res=jnp.asarray(nhwc(d[p + "inputs/low_res"])))
        run = jax.jit(functools.partial(sampling.ddim_sample_loop_with_noise, model_fn, sched, eta=0.0,
                                        return_trajectory=True, clip_denoised=True, **EMB))
        y = {"tokens": d[p + "inputs/tokens"], "mask": d[p + "inputs/mask"]}
        x_T = nhwc(d[p + "inputs/x_T"])
        assert_close(x_T, nhwc(d[p + "inputs/randn_init"]) * 0.997, 1e-6, what="x_T")
        traj = run(x_T, nhwc(d[p + "inputs/step_noise"]), y=y)
        assert_close(traj.samples, nhwc(d[p + "samples"]), 1e-3, 1e-3, what="samples")
        assert_close(traj.pred_xstart, nhwc(d[p + "pred_xstart"]), 1e-3, 1e-3, what="pred_xstart")

    @parameterized.parameters(*KERNELS)
    def test_inpaint_loop(self, kernels):
        """The inpainting notebook: its CFG model_fn (s = 5) and known-region denoised_fn, all rows."""
        d, p = io("inp_pub"), "loop0_p_sample_loop_inpaint/"
        module, params = net("inp_pub")
        module = module.clone(kernels=kernels)
        sched = convert_glide.make_glide_schedule("squaredcos_cap_v2", 1000, "5")
        img, msk = nhwc(d[p + "inputs/inpaint_image"]), nhwc(d[p + "inputs/inpaint_mask"])
        base = glide.glide_model_fn(module, params, inpaint_image=jnp.asarray(img), inpaint_mask=jnp.asarray(msk))
        model_fn = notebook_cfg_model_fn(base, 5.0)

        def denoised_fn(x_start):
            return x_start * (1 - msk) + img * msk

        run = jax.jit(functools.partial(sampling.p_sample_loop_with_noise, model_fn, sched, return_trajectory=True,
                                        clip_denoised=True, denoised_fn=denoised_fn, **EMB))
        y = {"tokens": d[p + "inputs/tokens"], "mask": d[p + "inputs/mask"]}
        traj = run(nhwc(d[p + "inputs/x_T"]), nhwc(d[p + "inputs/step_noise"]), y=y)
        assert_close(traj.samples, nhwc(d[p + "samples"]), 1e-3, 1e-3, what="samples")
        assert_close(traj.pred_xstart, nhwc(d[p + "pred_xstart"]), 1e-3, 1e-3, what="pred_xstart")


# ----------------------------------------------------------------------------- diffusion.npz
class DiffusionParityTest(parameterized.TestCase):

    def test_schedule_tables(self):
        d = diffusion_npz()
        tables = schedules.schedule_tables(schedules.get_named_beta_schedule("squaredcos_cap_v2", 1000))
        prefix = "schedules/squaredcos_cap_v2_1000/"
        for key in (k for k in d if k.startswith(prefix)):
            np.testing.assert_allclose(tables[key[len(prefix):]], d[key], rtol=1e-12, atol=0, err_msg=key)

    @parameterized.parameters(("squaredcos_cap_v2", "100"), ("squaredcos_cap_v2", "10"),
                              ("squaredcos_cap_v2", "ddim50"), ("linear", "fast27"))
    def test_respacing(self, schedule, respacing):
        d = diffusion_npz()
        prefix = f"respacing/{schedule}_1000_{respacing}/"
        steps = sorted(convert_glide.glide_space_timesteps(1000, respacing))
        np.testing.assert_array_equal(steps, d[prefix + "use_timesteps"])
        s = convert_glide.make_glide_schedule(schedule, 1000, respacing)
        np.testing.assert_array_equal(s.timestep_map, d[prefix + "timestep_map"])
        betas, _ = schedules.respace_betas(schedules.get_named_beta_schedule(schedule, 1000), steps)
        np.testing.assert_allclose(betas, d[prefix + "betas"], rtol=1e-12)
        np.testing.assert_allclose(s.betas, d[prefix + "betas"], rtol=1e-6)

    def test_fast27_swaps_last_step(self):
        steps = convert_glide.glide_space_timesteps(1000, "fast27")
        self.assertLen(steps, 27)
        self.assertIn(997, steps)
        self.assertNotIn(999, steps)

    def test_steps(self):
        d = diffusion_npz()
        s = convert_glide.make_glide_schedule("squaredcos_cap_v2", 1000, "10")
        x, t = nhwc(d["steps/inputs/x_t"]), jnp.asarray(d["steps/inputs/t"], jnp.int32)
        out, noise = nhwc(d["steps/inputs/model_output"]), nhwc(d["steps/inputs/noise"])
        np.testing.assert_array_equal(s.model_timesteps(t), d["steps/model_timesteps"])
        tol = {"atol": 1e-5, "rtol": 1e-5}
        for clip in (True, False):
            pmv = gaussian.p_mean_variance(s, out, x, t, clip_denoised=clip, **EMB)
            for field in pmv._fields:
                want = d[f"steps/p_mean_variance/clip_{str(clip).lower()}/{field}"]
                assert_close(np.broadcast_to(getattr(pmv, field), x.shape), nhwc(want), **tol, what=field)
        model_fn = lambda *_: out
        got = sampling.p_sample(s, model_fn, x, t, noise, **EMB)
        assert_close(got[0], nhwc(d["steps/p_sample/sample"]), **tol, what="p_sample")
        assert_close(got[1], nhwc(d["steps/p_sample/pred_xstart"]), **tol, what="p_sample x0")
        for eta in (0.0, 0.5):
            got = sampling.ddim_sample(s, model_fn, x, t, noise, eta=eta, **EMB)
            assert_close(got[0], nhwc(d[f"steps/ddim_sample_eta_{eta}/sample"]), **tol, what=f"ddim {eta}")
            assert_close(got[1], nhwc(d[f"steps/ddim_sample_eta_{eta}/pred_xstart"]), **tol, what=f"ddim x0 {eta}")


# ----------------------------------------------------------------------------- conversion
class ConvertGlideTest(parameterized.TestCase):

    @parameterized.parameters(*NETS)
    def test_pt_equals_npz(self, name):
        _, a = net(name, "npz")
        _, b = net(name, "pt")
        jax.tree.map(np.testing.assert_array_equal, a, b)

    @parameterized.parameters(*NETS)
    def test_resolved_settings(self, name):
        m = meta(name)
        cfg = convert_glide.resolve_glide_flags(m["create_model_kwargs"])
        self.assertEqual(cfg["model"]["in_channels"], m["resolved"]["in_channels"])
        self.assertEqual(cfg["model"]["attention_resolutions"], tuple(m["resolved"]["attention_resolutions_ds"]))
        self.assertEqual(cfg["model"]["channel_mult"], tuple(m["resolved"]["channel_mult"]))
        n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(net(name)[1]))
        self.assertEqual(n, m["num_parameters"])

    def test_text_ctx_mismatch(self):
        flags = dict(meta("inp_pub")["create_model_kwargs"], text_ctx=12)
        with self.assertRaisesRegex(convert.CheckpointError, r"text_ctx=8, but the flags say text_ctx=12"):
            convert_glide.from_openai_glide(os.path.join(DATA, "unet_inp_pub_weights.npz"), flags)

    def test_strict_keys(self):
        sd = convert.load_state_dict(os.path.join(DATA, "unet_inp_pub_weights.npz"))
        sd.pop("final_ln.bias")
        sd["extra.weight"] = np.zeros(3, np.float32)
        sd["transformer_proj.weight"] = np.zeros((5, 32), np.float32)
        with self.assertRaises(convert.CheckpointError) as cm:
            convert_glide.from_openai_glide(sd, meta("inp_pub")["create_model_kwargs"])
        msg = str(cm.exception)
        for part in ("final_ln.bias", "extra.weight", "transformer_proj.weight: checkpoint (5, 32), expected (128, 32)"):
            self.assertIn(part, msg)

    def test_flag_errors(self):
        with self.assertRaisesRegex(ValueError, "unknown GLIDE flags"):
            convert_glide.resolve_glide_flags({"learn_sigma": True})
        with self.assertRaisesRegex(ValueError, "2 \\*\\* \\(levels \\+ 2\\)"):
            convert_glide.resolve_glide_flags({"image_size": 64, "channel_mult": "1,2"})
        with self.assertRaisesRegex(ValueError, "contradicts"):
            convert_glide.resolve_glide_flags({"kind": "glide", "super_res": True})

    def test_presets(self):
        base = convert_glide.resolve_glide_preset("base")
        self.assertEqual(base["kind"], "glide")
        self.assertEqual(base["model"]["channel_mult"], (1, 2, 3, 4))
        self.assertEqual(base["model"]["attention_resolutions"], (2, 4, 8))
        self.assertEqual((base["model"]["text_ctx"], base["model"]["xf_width"]), (128, 512))
        self.assertEqual(base["diffusion"]["noise_schedule"], "squaredcos_cap_v2")
        up = convert_glide.resolve_glide_preset("upsample")
        self.assertEqual((up["model"]["image_size"], up["model"]["in_channels"]), (256, 6))
        self.assertEqual(up["model"]["channel_mult"], (1, 1, 2, 2, 4, 4))
        self.assertEqual(up["model"]["attention_resolutions"], (8, 16, 32))
        self.assertEqual((up["model"]["num_res_blocks"], up["diffusion"]["noise_schedule"]), (2, "linear"))
        self.assertEqual(convert_glide.resolve_glide_preset("base-inpaint")["model"]["in_channels"], 7)
        upi = convert_glide.resolve_glide_preset("upsample-inpaint")
        self.assertEqual((upi["kind"], upi["model"]["in_channels"]), ("glide_upsample_inpaint", 10))
        self.assertEqual(convert_glide.resolve_glide_flags({"super_res": True, "inpaint": True})["kind"],
                         "glide_upsample_inpaint")

    def test_upsample_inpaint_model(self):
        """The SR + inpainting class: 10 trunk channels in GLIDE's order; state-dict round trip."""
        flags = dict(meta("inp_pub")["create_model_kwargs"], inpaint=True, super_res=True)
        cfg = convert_glide.resolve_glide_flags(flags)
        module = convert_glide.build_glide_model(cfg["kind"], **cfg["model"])
        args, kw = convert_glide.glide_example_inputs(cfg["kind"], cfg["model"])
        params = jax.jit(module.init)(jax.random.key(0), *args, **kw)["params"]
        self.assertEqual(params["input_blocks_0_0"]["kernel"].shape[2], 10)
        rng = np.random.default_rng(0)
        f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
        x, img = f32(rng.normal(size=(2, 8, 8, 3))), f32(rng.normal(size=(2, 8, 8, 3)))
        msk, low = f32(rng.random((2, 8, 8, 1)) > 0.5), f32(rng.normal(size=(2, 4, 4, 3)))
        trunk_input = functools.partial(module.apply, {"params": params}, method=lambda m, *a: m._trunk_input(*a))
        want = np.concatenate([x, img * msk, msk, jax.image.resize(low, (2, 8, 8, 3), "bilinear")], -1)
        assert_close(trunk_input(x, low, img, msk), want, 1e-6)
        with self.assertRaisesRegex(ValueError, "low_res"):
            trunk_input(x, None, img, msk)
        # Back to a PyTorch-layout state dict and in again: the same tree.
        sd = {}
        for path, v in jax.tree_util.tree_flatten_with_path(params)[0]:
            keys = tuple(k.key for k in path)
            v = np.asarray(v)
            if keys[-1] == "kernel":
                v = v.transpose(3, 2, 0, 1) if v.ndim == 4 else v.T
                if keys[-2] in ("qkv", "proj_out", "encoder_kv"):
                    v = v[:, :, None]
            sd[convert_glide.glide_torch_key(keys)] = v
        self.assertIn("transformer.resblocks.0.ln_1.weight", sd)
        self.assertEqual(sd["input_blocks.1.1.encoder_kv.weight"].shape, (64, 32, 1))
        _, again = convert_glide.from_openai_glide(sd, flags)
        jax.tree.map(np.testing.assert_array_equal, params, again)
