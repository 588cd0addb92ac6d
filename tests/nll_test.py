"""The NLL runner: equals OpenAI's per-t loop, device-count independent, unbiased K-step, resumable."""
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from diffusion_jax import gaussian, likelihood, schedules
from diffusion_jax.evaluation import nll, run
from diffusion_jax.models import UNet

jax.config.update("jax_disable_most_optimizations", True)

KW = dict(mean_type="epsilon", var_type="learned_range", clip_denoised=True)


def _setup(batch=8):
    module = UNet(image_size=8, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
                  channel_mult=(1,), num_classes=10)
    x = jax.random.randint(jax.random.key(1), (batch, 8, 8, 3), 0, 256).astype(jnp.float32) / 127.5 - 1.0
    params = jax.jit(module.init)(jax.random.key(0), x, jnp.zeros(batch, jnp.int32), jnp.zeros(batch, jnp.int32))["params"]
    # Perturb the zero-initialised output conv so the model is not trivial.
    params = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(jax.random.key(3), p.shape), params)
    labels = jnp.arange(batch, dtype=jnp.int32) % 10
    return module, params, x, labels


def _batches(x, labels, batch_size, stop_after=None):
    """A stand-in eval iterator over in-memory examples (single process)."""
    n = x.shape[0]

    def make(resume_start):
        for k, lo in enumerate(range(resume_start, n, batch_size)):
            if stop_after is not None and k == stop_after:
                raise KeyboardInterrupt("simulated kill")
            idx = lo + np.arange(batch_size)
            valid = idx < n
            src = np.where(valid, idx, 0)
            yield {"image": np.asarray(x)[src], "label": np.asarray(labels)[src],
                   "index": idx.astype(np.int32), "valid": valid}
    return make


class NllRunnerTest(absltest.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.module, cls.params, cls.x, cls.labels = _setup()
        cls.schedule = schedules.make_schedule("linear", 1000, "10")
        cls.apply = staticmethod(nll.module_apply(cls.module))

    def test_chain_equals_openai_style_loop(self):
        s, rng = self.schedule, jax.random.key(7)
        index = jnp.arange(8, dtype=jnp.int32) + 100
        fn = jax.jit(lambda p, x, y, i, r: nll.chain_terms(
            lambda xt, ts, yy: self.apply(p, xt, ts, yy), s, x, y, i, r, t_chunk=3, **KW))
        got = fn(self.params, self.x, self.labels, index, rng)

        @jax.jit
        def one_t(t_scalar):  # One step of calc_bpd_loop: q_sample, forward, _vb_terms_bpd.
            t = jnp.full((8,), t_scalar, jnp.int32)
            noise = jax.vmap(lambda i: nll.example_noise(rng, i, t_scalar, self.x.shape[1:]))(index)
            x_t = gaussian.q_sample(s, self.x, t, noise)
            out = self.module.apply({"params": self.params}, x_t, s.model_timesteps(t), self.labels)
            return likelihood.bpd_terms(s, out, self.x, x_t, t, noise, **KW)

        loop = [one_t(t) for t in reversed(range(s.num_timesteps))]  # OpenAI's order
        for field in ("vb", "mse", "xstart_mse"):
            want = np.stack([getattr(v, field) for v in loop[::-1]], axis=1)
            np.testing.assert_allclose(getattr(got, field), want, rtol=1e-5, atol=1e-6, err_msg=field)
        prior = likelihood.prior_bpd(s, self.x)
        np.testing.assert_allclose(got.prior, prior, rtol=1e-6, atol=1e-7)  # prior ~1e-5 bpd
        total = sum(v.vb for v in loop) + prior
        np.testing.assert_allclose(got.total, total, rtol=1e-5)

    def test_one_vs_eight_devices_and_chunking(self):
        batch = {"image": self.x, "label": self.labels, "index": jnp.arange(8, dtype=jnp.int32),
                 "valid": jnp.ones(8, bool)}
        outs, flops = [], []
        for n, fsdp, t_chunk in ((1, 1, 10), (8, 1, 4), (8, 4, 4)):
            mesh = nll.make_mesh(n, fsdp=fsdp)
            step = nll.make_chain_fn(self.apply, self.schedule, mesh=mesh, t_chunk=t_chunk, class_cond=True, **KW)
            args = (self.params, nll.global_batch(mesh, batch), jax.random.key(3))
            outs.append(step(*args)[0])
            flops.append(step.lower(*args).compile().cost_analysis()["flops"])  # per device
        for out in outs[1:]:
            for a, b, name in zip(outs[0], out, nll.NllBatch._fields):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)
        # An FSDP mesh splits the examples over all 8 devices too: no device repeats another's work.
        self.assertLess(flops[2], 1.1 * flops[1])
        self.assertLess(flops[1], 0.25 * flops[0])

    def test_importance_sampled_estimate_is_unbiased(self):
        s, x, y = self.schedule, self.x[:4], self.labels[:4]
        index = jnp.arange(4, dtype=jnp.int32)
        # A deliberately lopsided proposal: unbiasedness must not depend on p.
        proposal = nll.proposal_from_profile(np.linspace(1.0, 0.1, s.num_timesteps), uniform_mix=0.2)
        est = nll.make_nll_estimator(self.apply, s, num_draws=2, proposal=proposal, class_cond=True, **KW)
        chain = jax.jit(lambda p, r: nll.chain_terms(lambda xt, ts, yy: self.apply(p, xt, ts, yy), s, x, y,
                                                     index, r, t_chunk=10, **KW).total)
        diffs = []
        for r in range(150):
            rng = jax.random.key(r)
            e = est(self.params, {"image": x, "label": y, "index": index}, rng)
            # Same noise as the estimator: E[est | noise] equals this chain's total exactly.
            c = chain(self.params, jax.random.split(rng)[1])
            diffs.append(np.asarray(e - c, np.float64))
        diffs = np.concatenate(diffs)
        se = diffs.std(ddof=1) / np.sqrt(diffs.size)
        self.assertLess(abs(diffs.mean()), 4 * se, f"mean {diffs.mean()} vs s.e. {se}")
        self.assertGreater(se, 0.0)

    def test_bad_proposal_rejected(self):
        with self.assertRaisesRegex(ValueError, "proposal weight > 0"):
            nll.make_nll_estimator(self.apply, self.schedule, proposal=np.eye(10)[0], **KW)

    def test_resume_and_refusal(self):
        mesh = nll.make_mesh(8)
        step = nll.make_chain_fn(self.apply, self.schedule, mesh=mesh, t_chunk=5, class_cond=True, **KW)
        x = jnp.concatenate([self.x, self.x[:4] * 0.5])  # 12 examples, batches of 8: one padded batch
        labels = jnp.concatenate([self.labels, self.labels[:4]])
        settings = {"seed": 0, "split": "test", "t_chunk": 5}
        common = dict(mesh=mesh, rng=jax.random.key(0), num_timesteps=10, start=0, stop=12, batch_size=8,
                      progress=False)
        full = run.run_nll(step, self.params, _batches(x, labels, 8), settings=settings, **common)
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp)
        path = os.path.join(tmp, "nll.partial.npz")
        with self.assertRaises(KeyboardInterrupt):
            run.run_nll(step, self.params, _batches(x, labels, 8, stop_after=1), settings=settings,
                        partial_file=path, **common)
        self.assertLen(np.load(path)["index"], 8)
        # t_chunk may change on resume; the seed may not.
        resumed = run.run_nll(step, self.params, _batches(x, labels, 8), settings=dict(settings, t_chunk=2),
                              partial_file=path, **common)
        for name in run.Partial._fields:
            np.testing.assert_allclose(getattr(resumed, name), getattr(full, name), rtol=1e-6, err_msg=name)
        with self.assertRaisesRegex(run.ResumeError, r"seed: stored 0, now 1"):
            run.run_nll(step, self.params, _batches(x, labels, 8), settings=dict(settings, seed=1),
                        partial_file=path, **common)
        report = run.nll_report(full, settings, start=0, stop=12)
        self.assertEqual(report["num_examples"], 12)
        np.testing.assert_allclose(report["bits_per_dim"], full.total.mean())
        q_sum = sum(v["sum"] for v in report["terms_by_quartile"]["vb"].values())
        np.testing.assert_allclose(q_sum + report["prior_bpd"], report["bits_per_dim"], rtol=1e-6)
        self.assertIn("bits/dim", run.format_table(report))


if __name__ == "__main__":
    absltest.main()
