"""Tests for diffusion_jax.convert / openai_flags: strict, exact checkpoint import."""

import json
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from diffusion_jax import convert
from diffusion_jax.convert import kinds, openai_flags, presets

jax.config.update("jax_disable_most_optimizations", True)

DATA = os.path.join(os.path.dirname(__file__), "data", "parity")

try:
    import torch
except ImportError:  # torch is optional (diffusion_jax[torch]).
    torch = None

# README-style flag strings that rebuild the three parity networks.
FIXTURE_FLAGS = {
    "idiff_pub": (
        "improved",
        (
            "--image_size 32 --num_channels 32 --channel_mult 1,1,2 --num_res_blocks 1"
            " --attention_resolutions 16,8 --num_heads 4 --learn_sigma True --class_cond True"
            " --num_classes 10 --dropout 0.0"
        ),
    ),
    "gdiff_unet_pub": (
        "guided",
        (
            "--image_size 32 --num_channels 32 --channel_mult 1,1,1 --num_res_blocks 2"
            " --attention_resolutions 16,8 --num_head_channels 16 --learn_sigma True --class_cond True"
            " --num_classes 10 --resblock_updown True --use_new_attention_order True"
        ),
    ),
    "gdiff_cls_pub": (
        "guided",
        (
            "--kind classifier --image_size 32 --classifier_width 32 --classifier_depth 1"
            " --classifier_attention_resolutions 16 --classifier_channel_mult 1,1,1"
            " --classifier_num_head_channels 16 --num_classes 10 --classifier_pool attention"
        ),
    ),
}


def tmpdir(test) -> str:
    """A temp dir removed after the test (absltest's create_tempdir needs parsed flags)."""
    d = tempfile.mkdtemp()
    test.addCleanup(shutil.rmtree, d, ignore_errors=True)
    return d


def fixture(name):
    with open(os.path.join(DATA, f"unet_{name}.json")) as f:
        meta = json.load(f)
    return meta, dict(np.load(os.path.join(DATA, f"unet_{name}_weights.npz")))


class FlagsTest(parameterized.TestCase):
    @parameterized.parameters(*FIXTURE_FLAGS)
    def test_fixture_flags_resolve_to_constructor(self, name):
        meta, _ = fixture(name)
        repo, text = FIXTURE_FLAGS[name]
        cfg = convert.parse_openai_flags(text, repo)
        want = meta["constructor_kwargs"]
        for k, v in cfg["model"].items():
            if k in want and k != "image_size":
                self.assertEqual(
                    tuple(v) if isinstance(v, tuple) else v,
                    tuple(want[k]) if isinstance(want[k], list) else want[k],
                    k,
                )

    def test_repo_defaults_differ(self):
        base = "--image_size 64 --learn_sigma True"
        imp, gui = (
            convert.parse_openai_flags(base, "improved"),
            convert.parse_openai_flags(base, "guided"),
        )
        self.assertTrue(imp["diffusion"]["rescale_timesteps"])
        self.assertEqual(imp["diffusion"]["loss_type"], "rescaled_mse")
        self.assertFalse(gui["diffusion"]["rescale_timesteps"])
        self.assertEqual(gui["diffusion"]["loss_type"], "mse")
        self.assertEqual(
            imp["model"]["attention_resolutions"], (4, 8)
        )  # "16,8" at 64 px
        self.assertEqual(imp["model"]["channel_mult"], (1, 2, 3, 4))
        self.assertEqual(imp["diffusion"]["var_type"], "learned_range")

    def test_diffusion_types(self):
        d = convert.parse_openai_flags(
            "--sigma_small yes --predict_xstart T", "improved"
        )["diffusion"]
        self.assertEqual((d["var_type"], d["mean_type"]), ("fixed_small", "start_x"))
        d = convert.parse_openai_flags(
            "--use_kl 1 --rescale_learned_sigmas False", "improved"
        )["diffusion"]
        self.assertEqual(
            (d["var_type"], d["loss_type"]), ("fixed_large", "rescaled_kl")
        )
        d = convert.parse_openai_flags(
            "--timestep_respacing=ddim25 --noise_schedule cosine", "guided"
        )
        self.assertEqual(d["diffusion"]["timestep_respacing"], "ddim25")

    def test_bad_flags(self):
        with self.assertRaisesRegex(ValueError, r"\['bogus', 'sigma_small'\]"):
            convert.parse_openai_flags("--sigma_small True --bogus 1", "guided")
        with self.assertRaisesRegex(ValueError, "boolean"):
            convert.parse_openai_flags("--learn_sigma maybe", "guided")
        with self.assertRaisesRegex(ValueError, "no default channel_mult for size 48"):
            convert.parse_openai_flags("--image_size 48", "guided")
        with self.assertRaisesRegex(ValueError, "repo"):
            convert.parse_openai_flags("--image_size 64", "glide")
        with self.assertRaisesRegex(ValueError, "cannot build"):
            convert.from_openai(
                {}, {"image_size": 32, "num_channels": 32, "num_head_channels": 24}
            )

    def test_presets(self):
        repos = [p["repo"] for p in convert.PRESETS.values()]
        self.assertEqual((repos.count("improved"), repos.count("guided")), (8, 15))
        cfgs = {name: presets.resolve_preset(name) for name in convert.PRESETS}
        m = cfgs["512x512_diffusion"]["model"]
        self.assertEqual(
            (m["channel_mult"], m["attention_resolutions"], m["num_classes"]),
            ((0.5, 1, 1, 2, 2, 4, 4), (16, 32, 64), 1000),
        )
        m = cfgs["64x64_diffusion"]["model"]
        self.assertTrue(m["use_new_attention_order"])
        self.assertEqual(
            (m["attention_resolutions"], m["num_head_channels"]), ((2, 4, 8), 64)
        )
        self.assertEqual(
            cfgs["64x64_diffusion"]["diffusion"]["noise_schedule"], "cosine"
        )
        up = cfgs["upsample_cond_500K"]
        self.assertEqual(up["kind"], "super_res")
        self.assertEqual(
            (up["model"]["in_channels"], up["model"]["attention_resolutions"]),
            (6, (16, 32)),
        )
        self.assertEqual(
            cfgs["128_512_upsampler"]["model"]["channel_mult"], (1, 1, 2, 2, 4, 4)
        )
        lsun = cfgs["lsun_uncond_100M_1200K_bs128"]["model"]
        self.assertEqual(
            (
                lsun["num_heads"],
                lsun["use_scale_shift_norm"],
                lsun["attention_resolutions"],
            ),
            (1, False, (16,)),
        )
        c = cfgs["cifar10_uncond_50M_500K"]
        self.assertEqual(
            (c["model"]["dropout"], c["diffusion"]["diffusion_steps"]), (0.3, 4000)
        )
        self.assertTrue(c["diffusion"]["rescale_timesteps"])
        self.assertEqual(
            cfgs["cifar10_uncond_vlb_50M_500K"]["diffusion"]["loss_type"], "rescaled_kl"
        )
        self.assertFalse(
            cfgs["imagenet64_cond_270M_250K"]["diffusion"]["rescale_timesteps"]
        )
        cls = cfgs["64x64_classifier"]
        self.assertEqual(cls["kind"], "classifier")
        self.assertEqual(
            (
                cls["model"]["num_res_blocks"],
                cls["model"]["attention_resolutions"],
                cls["model"]["out_channels"],
                cls["model"]["pool"],
            ),
            (4, (2, 4, 8), 1000, "attention"),
        )
        self.assertEqual(cfgs["lsun_horse_nodropout"]["model"]["dropout"], 0.0)
        self.assertEqual(cfgs["lsun_horse"]["model"]["dropout"], 0.1)

    def test_preset_builds(self):
        cfg = presets.resolve_preset("cifar10_uncond_50M_500K")
        module = kinds.build(cfg["kind"], **cfg["model"])
        shapes = convert.param_shapes(module, cfg["kind"], cfg["model"])
        self.assertEqual(shapes[("out_2", "kernel")].shape, (3, 3, 128, 6))


class ImportTest(parameterized.TestCase):
    @parameterized.parameters(*FIXTURE_FLAGS)
    def test_from_openai_npz_layouts(self, name):
        _, sd = fixture(name)
        repo, text = FIXTURE_FLAGS[name]
        flags = dict(openai_flags.parse_flag_string(text), repo=repo)
        _module, params = convert.from_openai(
            os.path.join(DATA, f"unet_{name}_weights.npz"), flags
        )
        n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))
        self.assertEqual(n, sum(v.size for v in sd.values()))
        self.assertTrue(all(v.dtype == jnp.float32 for v in jax.tree.leaves(params)))
        np.testing.assert_array_equal(
            params["input_blocks_1_0"]["in_layers_2"]["kernel"],
            sd["input_blocks.1.0.in_layers.2.weight"].transpose(2, 3, 1, 0),
        )
        np.testing.assert_array_equal(
            params["time_embed_0"]["kernel"], sd["time_embed.0.weight"].T
        )
        np.testing.assert_array_equal(
            params["middle_block_1"]["qkv"]["kernel"],
            sd["middle_block.1.qkv.weight"][:, :, 0].T,
        )
        if name == "gdiff_cls_pub":
            np.testing.assert_array_equal(
                params["out_2"]["positional_embedding"],
                sd["out.2.positional_embedding"].T,
            )
        else:
            np.testing.assert_array_equal(
                params["label_emb"]["embedding"], sd["label_emb.weight"]
            )

    def test_pt_safetensors_fp16_agree(self):
        from safetensors.numpy import save_file

        name = "gdiff_cls_pub"
        _, sd = fixture(name)
        repo, text = FIXTURE_FLAGS[name]
        flags = dict(openai_flags.parse_flag_string(text), repo=repo)
        _, ref = convert.from_openai(sd, flags)
        path = os.path.join(tmpdir(self), "model.safetensors")
        save_file(sd, path)
        jax.tree.map(
            np.testing.assert_array_equal, ref, convert.from_openai(path, flags)[1]
        )
        if torch is not None:
            pt = convert.from_openai(os.path.join(DATA, f"unet_{name}.pt"), flags)[1]
            jax.tree.map(np.testing.assert_array_equal, ref, pt)
        half = {k: v.astype(np.float16) for k, v in sd.items()}
        p16 = convert.from_openai(half, flags)[1]
        self.assertTrue(all(v.dtype == jnp.float32 for v in jax.tree.leaves(p16)))
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3),
            ref,
            p16,
        )

    def test_all_key_problems_listed_together(self):
        name = "gdiff_cls_pub"
        _, sd = fixture(name)
        flags = dict(openai_flags.parse_flag_string(FIXTURE_FLAGS[name][1]))
        del sd["time_embed.0.bias"], sd["out.2.c_proj.bias"]
        sd["extra.weight"] = np.zeros(3, np.float32)
        sd["input_blocks.0.0.weight"] = np.zeros((32, 4, 3, 3), np.float32)
        with self.assertRaises(convert.CheckpointError) as cm:
            convert.from_openai(sd, flags)
        msg = str(cm.exception)
        for s in (
            "missing keys (2)",
            "out.2.c_proj.bias",
            "time_embed.0.bias",
            "unexpected keys (1)",
            "extra.weight",
            "mis-shaped keys (1)",
            (
                "input_blocks.0.0.weight: checkpoint (32, 4, 3, 3), "
                "expected (32, 3, 3, 3)"
            ),
        ):
            self.assertIn(s, msg)

    def test_bad_files(self):
        tmp = tmpdir(self)
        flags = {"image_size": 32}
        junk = os.path.join(tmp, "model.pt")
        with open(junk, "wb") as f:
            f.write(b"this is not a checkpoint at all" * 10)
        for ext in (".pt", ".npz", ".safetensors", ".txt"):
            path = junk[:-3] + ext
            os.replace(junk, path) if os.path.exists(junk) else None
            junk = path
            if ext == ".pt" and torch is None:
                continue
            with self.assertRaisesRegex(convert.CheckpointError, "not a"):
                convert.load_state_dict(path)
        with self.assertRaisesRegex(convert.CheckpointError, "model\\*.pt"):
            convert.load_state_dict(os.path.join(tmp, "opt012345.pt"))
        with self.assertRaisesRegex(convert.CheckpointError, "optimizer state"):
            convert.from_openai({"state": {}, "param_groups": []}, flags)
        with self.assertRaisesRegex(convert.CheckpointError, "non-array"):
            convert.load_state_dict({"a": np.zeros(2), "step": 3})

    def test_pt_with_pickled_code_is_refused(self):
        if torch is None:
            self.skipTest("torch not installed")
        path = os.path.join(tmpdir(self), "model.pt")
        torch.save({"w": torch.zeros(2), "extra": _Custom()}, path)
        with self.assertRaisesRegex(
            convert.CheckpointError, "Re-save just the state_dict"
        ):
            convert.load_state_dict(path)

    def test_torch_key_mapping(self):
        self.assertEqual(
            convert.torch_key(("input_blocks_1_0", "in_layers_2", "kernel")),
            "input_blocks.1.0.in_layers.2.weight",
        )
        self.assertEqual(
            convert.torch_key(("out_2", "qkv_proj", "bias")), "out.2.qkv_proj.bias"
        )
        self.assertEqual(
            convert.torch_key(("label_emb", "embedding")), "label_emb.weight"
        )


class _Custom:  # pickled by reference: weights_only loading must refuse it
    pass


class ConvertedDirTest(absltest.TestCase):
    def test_cli_round_trip_and_parity(self):
        name = "gdiff_cls_pub"
        out = tmpdir(self)
        ckpt = os.path.join(DATA, f"unet_{name}_weights.npz")
        convert.main(
            [
                "--checkpoint",
                ckpt,
                "--flags",
                FIXTURE_FLAGS[name][1],
                "--repo",
                "guided",
                "--out",
                out,
            ]
        )
        module, params, config = convert.load_converted(out)
        self.assertEqual(config["kind"], "classifier")
        self.assertEqual(config["source"]["checkpoint"], ckpt)
        self.assertIn("diffusion", config)
        io = np.load(os.path.join(DATA, f"unet_{name}_io.npz"))
        logits = jax.jit(module.apply)(
            {"params": params},
            io["inputs/x"].transpose(0, 2, 3, 1),
            io["inputs/timesteps_int"].astype(np.int32),
        )
        np.testing.assert_allclose(
            logits, io["outputs/out_timesteps_int"], atol=1e-4, rtol=1e-4
        )

        # A config that no longer matches the stored params is refused, listing keys.
        config["model"]["classifier_width"] = 0
        config["model"]["model_channels"] = 64
        del config["model"]["classifier_width"]
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(config, f)
        with self.assertRaisesRegex(convert.CheckpointError, "mis-shaped keys"):
            convert.load_converted(out)


if __name__ == "__main__":
    absltest.main()
