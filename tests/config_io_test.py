"""Tests for diffusion_jax.runtime.config_io: stored config.json -> the ConfigDict training writes."""

import importlib
import json
import os
import shutil
import tempfile

import jax
import numpy as np
from absl.testing import absltest, parameterized

from diffusion_jax import convert
from diffusion_jax.runtime import checkpoints, config_io, defaults

CONFIGS = ("digits", "digits_classifier", "digits_sr", "glide_digits", "glide_upsample", "cifar10", "tiny")


def _stored(config) -> dict:
    """What training writes: the config as JSON."""
    return json.loads(json.dumps(checkpoints.config_to_dict(config)))


def _write(directory: str, stored: dict) -> str:
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(stored, f)
    return os.path.join(directory, "config.json")


class ConfigIOTest(parameterized.TestCase):

    def setUp(self):
        super().setUp()
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir, ignore_errors=True)

    @parameterized.parameters(*CONFIGS)
    def test_training_config_round_trips(self, name):
        config = importlib.import_module(f"configs.{name}").get_config()
        _write(self.dir, _stored(config))
        back = checkpoints.config_to_dict(config_io.load_config(self.dir))
        want = checkpoints.config_to_dict(config)
        for key, value in want["model"].items():
            self.assertEqual(back["model"][key], value, key)
        back.pop("model"), want.pop("model")
        self.assertEqual(back, want)

    def test_missing_fields_take_the_one_default(self):
        stored = _stored(defaults.get_config())
        del stored["diffusion"]["schedule_sampler"], stored["train"], stored["model"]["dropout"]
        stored["model"].pop("kernels", None)
        got = config_io.config_from_dict(stored)
        self.assertEqual(got.diffusion.schedule_sampler, defaults.get_config().diffusion.schedule_sampler)
        self.assertEqual(got.train.to_dict(), defaults.get_config().train.to_dict())
        self.assertEqual(got.model.dropout, config_io.model_defaults("unet")["dropout"])

    def test_converted_directory_reads_into_the_same_shape(self):
        flags = dict(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="4",
                     learn_sigma=True, class_cond=True, num_classes=3)
        cfg = convert.resolve_flags(flags)
        module = convert.kinds.build(cfg["kind"], **cfg["model"])
        shapes = convert.param_shapes(module, cfg["kind"], cfg["model"])
        params = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), convert.state_dict.unflatten(shapes))
        convert.save_converted(self.dir, cfg, params, {"repo": "guided", "flags": "..."})
        got = config_io.load_config(self.dir)
        self.assertEqual(got.kind, "unet")
        for key, value in cfg["model"].items():
            self.assertEqual(got.model[key], value, key)
        for key, value in cfg["diffusion"].items():
            self.assertEqual(got.diffusion[key], value, key)
        self.assertEqual(got.diffusion.schedule_sampler, defaults.get_config().diffusion.schedule_sampler)
        self.assertEqual(got.source.repo, "guided")
        self.assertEqual(set(got.keys()), set(defaults.get_config().keys()) | {"source"})
        # It was trained on no dataset of ours: evaluate.py must ask for --data, not fall back to digits.
        self.assertEqual(checkpoints.load_for_inference(self.dir)[2]["data"]["name"], "")

    @parameterized.parameters(
        ({"bogus": 1}, "'bogus'"),
        ({"diffusion": {"bogus": 1}}, "diffusion.'bogus'"),
        ({"model": {"bogus": 1}}, "model.*bogus.*'unet'"),
        ({"kind": "vae"}, "unknown model kind 'vae'"),
    )
    def test_unknown_keys_are_refused_naming_key_and_file(self, extra, pattern):
        stored = _stored(defaults.get_config())
        for k, v in extra.items():
            stored[k] = {**stored[k], **v} if isinstance(v, dict) else v
        path = _write(self.dir, stored)
        with self.assertRaisesRegex(ValueError, pattern) as ctx:
            config_io.load_config(self.dir)
        if not extra.get("kind"):
            self.assertIn(path, str(ctx.exception))

    def test_no_config_file(self):
        with self.assertRaisesRegex(FileNotFoundError, "no config.json"):
            config_io.load_config(self.dir)


if __name__ == "__main__":
    absltest.main()
