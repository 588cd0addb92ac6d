"""Tests for diffusion_jax.convert.kinds (the model-kind table) and the convert package's layering."""

import ast
import os

import jax
import numpy as np
from absl.testing import absltest, parameterized

from diffusion_jax import convert
from diffusion_jax.convert import conversions, glide, kinds
from diffusion_jax.convert.state_dict import torch_key

jax.config.update("jax_disable_most_optimizations", True)

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "diffusion_jax")
# Tiny flag sets, one per importable kind (ADM: script_util names; GLIDE: model_creation names).
TINY_GLIDE = dict(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1", attention_resolutions="8",
                  num_head_channels=8, text_ctx=4, xf_width=16, xf_layers=1, xf_heads=2)
TINY_ADM = dict(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="4",
                num_heads=2)
TINY_FLAGS = {
    "unet": dict(TINY_ADM, kind="unet", learn_sigma=True, class_cond=True, num_classes=3),
    "super_res": dict(TINY_ADM, kind="super_res", large_size=8, small_size=4, channel_mult="1,2"),
    "classifier": dict(kind="classifier", image_size=8, classifier_width=32, classifier_depth=1,
                       classifier_attention_resolutions="4", classifier_channel_mult="1,2",
                       classifier_num_head_channels=8, num_classes=3),
    "glide": dict(TINY_GLIDE, kind="glide"),
    "glide_upsample": dict(TINY_GLIDE, kind="glide_upsample"),
    "glide_inpaint": dict(TINY_GLIDE, kind="glide_inpaint"),
    "glide_upsample_inpaint": dict(TINY_GLIDE, kind="glide_upsample_inpaint"),
}


class TableTest(parameterized.TestCase):

    def test_rows_are_consistent(self):
        for name, spec in kinds.KINDS.items():
            self.assertEqual(spec.name, name)
            self.assertLessEqual(set(spec.inputs), set(kinds.INPUTS), name)
            self.assertIn(spec.role, kinds.ROLES, name)
            self.assertIn(spec.dialect, kinds.DIALECTS, name)
            self.assertEqual(conversions.of(name).dialect, spec.dialect, name)
            self.assertTrue(callable(conversions.of(name).resolve_flags), name)
            if spec.samples or spec.trains:
                self.assertNotEqual(spec.role, "encoder", name)

    def test_dialects_agree_with_their_resolvers(self):
        """Each family's resolver returns every kind the table gives it and refuses the others."""
        for name, spec in kinds.KINDS.items():
            for dialect, conversion in conversions.CONVERSIONS.items():
                if dialect == spec.dialect or dialect == "clip":
                    continue
                with self.assertRaisesRegex(ValueError, "kind must be one of"):
                    conversion.resolve_flags({"kind": name})
        for name in TINY_FLAGS:
            self.assertEqual(conversions.of(name).resolve_flags(TINY_FLAGS[name])["kind"], name)

    def test_denoiser_taking(self):
        for name, spec in kinds.KINDS.items():
            want = spec.role == "denoiser"
            self.assertEqual(kinds.denoiser_taking(name, *sorted(spec.inputs)), want, name)
            self.assertFalse(kinds.denoiser_taking(name, *sorted(spec.inputs), "inpaint")
                             if "inpaint" not in spec.inputs else kinds.denoiser_taking(name), name)
        with self.assertRaisesRegex(ValueError, "unknown inputs"):
            kinds.denoiser_taking("unet", "audio")

    def test_from_noise(self):
        self.assertEqual(tuple(k for k, spec in kinds.KINDS.items() if spec.from_noise), ("unet", "glide"))

    def test_unknown_kind_lists_the_known_ones(self):
        with self.assertRaisesRegex(ValueError, "unknown model kind 'vae'.*glide_upsample"):
            kinds.get("vae")
        with self.assertRaisesRegex(ValueError, "unknown input"):
            kinds.takes("unet", "audio")
        with self.assertRaisesRegex(ValueError, "trainable kinds"):
            kinds.check_trainable("clip_text")

    def test_filters(self):
        self.assertEqual(kinds.names(takes="tokens"), tuple(k for k in kinds.KINDS if k.startswith("glide")))
        self.assertTrue(kinds.takes("glide_upsample_inpaint", "inpaint"))
        self.assertFalse(kinds.takes("unet", "tokens"))
        self.assertIn("unet", kinds.names(trains=True, samples=True))


class DispatchTest(parameterized.TestCase):

    @parameterized.parameters(*sorted(TINY_FLAGS))
    def test_from_openai_round_trip(self, kind):
        """Random Flax params -> torch-named state dict -> from_openai: the same tree, for every kind."""
        spec = kinds.get(kind)
        cfg = conversions.of(kind).resolve_flags(TINY_FLAGS[kind])
        self.assertEqual(cfg["kind"], kind)
        module = kinds.build(kind, **cfg["model"])
        shapes = convert.param_shapes(module, kind, cfg["model"])
        rng = np.random.default_rng(0)
        flat = {p: rng.standard_normal(s.shape).astype(np.float32) for p, s in shapes.items()}
        key_fn = glide.glide_torch_key if spec.dialect == "glide" else torch_key
        to_torch = {}
        for path, w in flat.items():  # invert the layout rules of state_dict.to_flax
            leaf = path[-1]
            if leaf == "kernel" and w.ndim == 4:
                w = w.transpose(3, 2, 0, 1)
            elif leaf == "kernel" or (leaf == "positional_embedding" and spec.dialect == "adm"):
                w = w.T
            to_torch[key_fn(path)] = w
        got_module, params = convert.from_openai(to_torch, TINY_FLAGS[kind])
        self.assertIs(type(got_module), spec.module)
        got = {tuple(k.key for k in p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
        self.assertEqual(set(got), set(flat))
        for path in flat:
            np.testing.assert_array_equal(got[path], flat[path], err_msg=str(path))

    def test_dispatch_without_kind(self):
        with self.assertRaisesRegex(ValueError, "unknown guided-diffusion flags"):
            convert.from_openai({}, {"bogus": 1})
        with self.assertRaisesRegex(ValueError, "unknown GLIDE flags"):
            convert.from_openai({}, {"xf_width": 16, "bogus": 1})
        with self.assertRaisesRegex(ValueError, "CLIP"):
            convert.from_openai({}, {"kind": "clip_text", "bogus": 1})
        with self.assertRaisesRegex(ValueError, "unknown model kind"):
            convert.from_openai({}, {"kind": "vae"})


def _imports(path: str, modules: set) -> set:
    """Modules of diffusion_jax that `path` imports (module level or lazily), parents excluded."""
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = {f"{node.module}.{a.name}" for a in node.names} & modules
            out |= subs if len(subs) == len(node.names) else subs | {node.module}
    return out & modules


class LayeringTest(absltest.TestCase):

    def test_convert_imports_no_higher_layer_and_no_cycle(self):
        modules = {}
        for d, _, files in os.walk(PKG):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(d, f[:-3]), os.path.dirname(PKG)).replace(os.sep, ".")
                    modules[rel.removesuffix(".__init__")] = os.path.join(d, f)
        edges = {m: {n for n in _imports(p, set(modules)) if not m.startswith(n + ".") and n != m}
                 for m, p in modules.items()
                 if m.startswith("diffusion_jax.convert") and m != "diffusion_jax.convert.__main__"}  # an entry point
        higher = ("runtime", "data", "training", "generation", "evaluation")
        for m, targets in edges.items():
            for n in targets:
                self.assertNotIn(n.split(".")[1], higher, f"{m} imports {n}")

        def reach(start, seen):
            for n in edges.get(start, ()):
                if n not in seen:
                    seen.add(n)
                    reach(n, seen)
            return seen

        for m in edges:
            self.assertNotIn(m, reach(m, set()), f"{m} is on an import cycle")


if __name__ == "__main__":
    absltest.main()
