"""Same-machine PyTorch peer for our benchmarks: OpenAI's guided-diffusion U-Net and per-step work.

A PyTorch re-implementation (written for this project; not OpenAI's code) of
guided-diffusion's ``UNetModel`` for the reference benchmark config (image 32,
model_channels 64, learn_sigma -> 6 outputs, 2 res blocks, attention at 16 px,
channel_mult (1, 2, 2, 2), 4 heads, legacy attention order, scale-shift norm,
no dropout, no classes) and of the work OpenAI does per step: ``TrainLoop``
with L_hybrid (cosine T = 1000, RESCALED_MSE, AdamW, EMA 0.9999),
``p_sample`` and one step of ``calc_bpd_loop``. Names follow OpenAI's
(modules, state-dict keys, methods), so it can be checked line by line and the
JAX model's parameters load into it. Plain NCHW float32, as OpenAI runs it.

    python bench/openai_torch.py check                  # same network as diffusion_jax.models.UNet?
    python bench/openai_torch.py forward [--runs 5] [--batch 8] [--threads 2]
    python bench/openai_torch.py train   [--runs 5]     # peer of "OpenAI's step took ~1.1 s"
    python bench/openai_torch.py sample  [--runs 5]     # peer of "~306 ms per p_sample step"
    python bench/openai_torch.py nll     [--runs 5]     # one calc_bpd_loop step; x T = 1000 per batch

``check`` loads our JAX UNet's (perturbed) parameters into this model and
compares outputs, then feeds one model output through both sides' L_hybrid and
calc_bpd_loop terms. The network itself is in ``bench/openai_torch_unet.py``.
Timing modes print median/min ms over ``--runs`` calls
after ``--warmup`` calls. Not timed: data loading, logger I/O, checkpointing.
``sample`` steps the full cosine T = 1000 chain (a respaced chain's step costs
the same).
"""

import argparse
import math
import os
import statistics
import sys
import time

import numpy as np
import torch as th

NUM_TIMESTEPS = 1000

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from openai_torch_unet import CONFIG, UNetModel  # noqa: E402


def mean_flat(tensor):
    return tensor.mean(dim=list(range(1, len(tensor.shape))))


# ----------------------------------------------------------------------------- diffusion
def cosine_betas(num_diffusion_timesteps, max_beta=0.999):
    alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    n = num_diffusion_timesteps
    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)])


def _extract_into_tensor(arr, timesteps, broadcast_shape):
    """float64 numpy table [T] -> float32 values at timesteps, broadcast to broadcast_shape."""
    res = th.from_numpy(arr).to(device=timesteps.device)[timesteps].float()
    while len(res.shape) < len(broadcast_shape):
        res = res[..., None]
    return res.expand(broadcast_shape)


def normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + th.exp(logvar1 - logvar2) + ((mean1 - mean2) ** 2) * th.exp(-logvar2))


def approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + th.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * th.pow(x, 3))))


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
    centered_x = x - means
    inv_stdv = th.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    log_cdf_plus = th.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = th.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = th.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return th.where(x < -0.999, log_cdf_plus, th.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


class GaussianDiffusion:
    """eps prediction, LEARNED_RANGE variance, RESCALED_MSE; a SpacedDiffusion over every step."""

    def __init__(self, betas):
        self.betas = betas
        self.num_timesteps = len(betas)
        self.timestep_map = list(range(self.num_timesteps))  # SpacedDiffusion, no respacing
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1],
                                                               self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

    def _wrap_model(self, model):  # SpacedDiffusion's _WrappedModel (rescale_timesteps=False)
        def wrapped(x, ts):
            map_tensor = th.tensor(self.timestep_map, device=ts.device, dtype=ts.dtype)
            return model(x, map_tensor[ts])
        return wrapped

    def q_sample(self, x_start, t, noise):
        return (_extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
                + _extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        posterior_mean = (_extract_into_tensor(self.posterior_mean_coef1, t, x_t.shape) * x_start
                          + _extract_into_tensor(self.posterior_mean_coef2, t, x_t.shape) * x_t)
        posterior_variance = _extract_into_tensor(self.posterior_variance, t, x_t.shape)
        posterior_log_variance_clipped = _extract_into_tensor(self.posterior_log_variance_clipped, t, x_t.shape)
        return posterior_mean, posterior_variance, posterior_log_variance_clipped

    def p_mean_variance(self, model, x, t, clip_denoised=True):
        C = x.shape[1]
        model_output = model(x, t)
        model_output, model_var_values = th.split(model_output, C, dim=1)
        min_log = _extract_into_tensor(self.posterior_log_variance_clipped, t, x.shape)
        max_log = _extract_into_tensor(np.log(self.betas), t, x.shape)
        frac = (model_var_values + 1) / 2  # the model's [-1, 1] -> [0, 1]
        model_log_variance = frac * max_log + (1 - frac) * min_log
        model_variance = th.exp(model_log_variance)
        pred_xstart = self._predict_xstart_from_eps(x_t=x, t=t, eps=model_output)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        model_mean, _, _ = self.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)
        return {"mean": model_mean, "variance": model_variance, "log_variance": model_log_variance,
                "pred_xstart": pred_xstart}

    def _predict_xstart_from_eps(self, x_t, t, eps):
        return (_extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                - _extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps)

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return ((_extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - pred_xstart)
                / _extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape))

    def p_sample(self, model, x, t, clip_denoised=True):
        out = self.p_mean_variance(self._wrap_model(model), x, t, clip_denoised=clip_denoised)
        noise = th.randn_like(x)
        nonzero_mask = (t != 0).float().view(-1, *([1] * (len(x.shape) - 1)))
        sample = out["mean"] + nonzero_mask * th.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True):
        true_mean, _, true_log_variance_clipped = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised)
        kl = normal_kl(true_mean, true_log_variance_clipped, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / np.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(x_start, means=out["mean"],
                                                           log_scales=0.5 * out["log_variance"])
        decoder_nll = mean_flat(decoder_nll) / np.log(2.0)
        return {"output": th.where((t == 0), decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses(self, model, x_start, t, noise=None):
        model = self._wrap_model(model)
        noise = th.randn_like(x_start) if noise is None else noise
        x_t = self.q_sample(x_start, t, noise=noise)
        terms = {}
        model_output = model(x_t, t)
        C = x_t.shape[1]
        model_output, model_var_values = th.split(model_output, C, dim=1)
        # The vb term trains only the variance: the mean goes in detached.
        frozen_out = th.cat([model_output.detach(), model_var_values], dim=1)
        terms["vb"] = self._vb_terms_bpd(model=lambda *args, r=frozen_out: r, x_start=x_start, x_t=x_t, t=t,
                                         clip_denoised=False)["output"]
        terms["vb"] *= self.num_timesteps / 1000.0  # RESCALED_MSE
        terms["mse"] = mean_flat((noise - model_output) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"]
        return terms

    def calc_bpd_step(self, model, x_start, t_batch, noise=None, clip_denoised=True):
        """The body of calc_bpd_loop's loop over t, for one t_batch: (vb, xstart_mse, mse), each [N]."""
        noise = th.randn_like(x_start) if noise is None else noise
        x_t = self.q_sample(x_start=x_start, t=t_batch, noise=noise)
        with th.no_grad():
            out = self._vb_terms_bpd(self._wrap_model(model), x_start=x_start, x_t=x_t, t=t_batch,
                                     clip_denoised=clip_denoised)
        xstart_mse = mean_flat((out["pred_xstart"] - x_start) ** 2)
        eps = self._predict_eps_from_xstart(x_t, t_batch, out["pred_xstart"])
        return out["output"], xstart_mse, mean_flat((eps - noise) ** 2)


# ----------------------------------------------------------------------------- TrainLoop step
class TrainStep:
    """One TrainLoop.run_step: UniformSampler t, L_hybrid, backward, norms, AdamW, EMA (no logging I/O)."""

    def __init__(self, model, diffusion, lr=1e-4, weight_decay=0.0, ema_rate=0.9999):
        self.model, self.diffusion, self.ema_rate = model, diffusion, ema_rate
        self.master_params = list(model.parameters())
        self.opt = th.optim.AdamW(self.master_params, lr=lr, weight_decay=weight_decay)
        self.ema_params = [p.detach().clone() for p in self.master_params]
        self.weights = np.ones([diffusion.num_timesteps])
        self.logged = {}

    def sample_t(self, batch_size):  # UniformSampler.sample
        p = self.weights / np.sum(self.weights)
        indices_np = np.random.choice(len(p), size=(batch_size,), p=p)
        weights_np = 1 / (len(p) * p[indices_np])
        return th.from_numpy(indices_np).long(), th.from_numpy(weights_np).float()

    def __call__(self, batch):
        for p in self.master_params:  # zero_grad as OpenAI's fp16_util does it
            if p.grad is not None:
                p.grad.detach_()
                p.grad.zero_()
        t, weights = self.sample_t(batch.shape[0])
        losses = self.diffusion.training_losses(self.model, batch, t)
        loss = (losses["loss"] * weights).mean()
        for key, values in {k: v * weights for k, v in losses.items()}.items():  # log_loss_dict's host reads
            self.logged[key] = values.mean().item()
            self.logged[key + "_per_sample"] = (t.numpy(), values.detach().numpy())
        loss.backward()
        grad_norm = param_norm = 0.0  # MixedPrecisionTrainer._compute_norms
        with th.no_grad():
            for p in self.master_params:
                param_norm += th.norm(p, p=2, dtype=th.float32).item() ** 2
                if p.grad is not None:
                    grad_norm += th.norm(p.grad, p=2, dtype=th.float32).item() ** 2
        self.logged.update(grad_norm=np.sqrt(grad_norm), param_norm=np.sqrt(param_norm))
        self.opt.step()
        for targ, src in zip(self.ema_params, self.master_params):  # update_ema
            targ.detach().mul_(self.ema_rate).add_(src, alpha=1 - self.ema_rate)


# ----------------------------------------------------------------------------- modes
def flax_to_torch(path, v):
    """One Flax leaf -> the layout of its OpenAI state-dict entry (inverse of convert.to_flax)."""
    v = np.asarray(v, np.float32)
    if path[-1] == "kernel" and v.ndim == 4:  # HWIO -> OIHW
        v = v.transpose(3, 2, 0, 1)
    elif path[-1] == "kernel" and v.ndim == 2:  # Dense [I, O] -> Linear [O, I] / Conv1d [O, I, 1]
        v = v.T[:, :, None] if path[-2] in ("qkv", "proj_out") else v.T
    return th.from_numpy(np.ascontiguousarray(v))


def check(args):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from diffusion_jax.runtime.xla_flags import set_cpu_flags
    set_cpu_flags()  # XLA:CPU options, before JAX starts its backend
    import jax
    import jax.numpy as jnp

    from diffusion_jax import convert, gaussian, likelihood, objectives, schedules
    from diffusion_jax.models import UNet

    module = UNet(**CONFIG)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, 32, 32, 3)).astype(np.float32)
    t = np.concatenate([[0, NUM_TIMESTEPS - 1], rng.integers(0, NUM_TIMESTEPS, args.batch - 2)])
    params = module.init(jax.random.key(0), jnp.asarray(x), jnp.asarray(t, jnp.int32))["params"]
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    noisy = [np.asarray(v) + 0.02 * rng.standard_normal(v.shape).astype(np.float32) for _, v in leaves]
    params = jax.tree_util.tree_unflatten(treedef, noisy)
    paths = [tuple(k.key for k in path) for path, _ in leaves]
    model = UNetModel(**CONFIG).eval()
    model.load_state_dict({convert.torch_key(p): flax_to_torch(p, v) for p, v in zip(paths, noisy)}, strict=True)
    # Round trip through the project's own (strict) converter: every name and layout must come back.
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    back = convert.params_from_state_dict(module, "unet", CONFIG, sd)
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)))
    print(f"state dict: {len(sd)} tensors, {sum(v.size for v in sd.values()):,} parameters; "
          f"load_state_dict(strict=True) ok; convert.params_from_state_dict round trip identical: {same}")
    y_jax = np.asarray(jax.jit(module.apply)({"params": params}, jnp.asarray(x), jnp.asarray(t, jnp.int32)))
    with th.no_grad():
        y_th = model(th.from_numpy(x).permute(0, 3, 1, 2).contiguous(), th.from_numpy(t)).permute(0, 2, 3, 1).numpy()
    diff = np.abs(y_jax - y_th).max()
    print(f"output [{args.batch}, 32, 32, 6]: max |jax - torch| = {diff:.3e}, relative to max |jax| "
          f"({np.abs(y_jax).max():.3f}) = {diff / np.abs(y_jax).max():.3e}, "
          f"relative L2 = {np.linalg.norm(y_jax - y_th) / np.linalg.norm(y_jax):.3e}")
    ours = schedules.get_named_beta_schedule("cosine", NUM_TIMESTEPS)
    print(f"cosine betas: max |ours - here| = {np.abs(ours - cosine_betas(NUM_TIMESTEPS)).max():.1e}")
    # The per-step math on one model output (y_jax; t includes 0 and T-1): L_hybrid and calc_bpd_loop terms.
    x0 = (rng.integers(0, 256, x.shape) / 127.5 - 1).astype(np.float32)
    noise = rng.standard_normal(x.shape).astype(np.float32)
    sched, tj = schedules.make_schedule("cosine", NUM_TIMESTEPS), jnp.asarray(t, jnp.int32)
    kw = dict(mean_type="epsilon", var_type="learned_range")
    xt = gaussian.q_sample(sched, jnp.asarray(x0), tj, jnp.asarray(noise))
    lj = objectives.training_losses(sched, y_jax, x0, xt, tj, noise, loss_type="rescaled_mse", **kw)
    bj = likelihood.bpd_terms(sched, y_jax, x0, xt, tj, noise, **kw)
    nchw = lambda a: th.from_numpy(np.ascontiguousarray(np.transpose(a, (0, 3, 1, 2))))
    diffusion, out = GaussianDiffusion(cosine_betas(NUM_TIMESTEPS)), lambda *_: nchw(y_jax)
    lt = diffusion.training_losses(out, nchw(x0), th.from_numpy(t), noise=nchw(noise))
    bt = diffusion.calc_bpd_step(out, nchw(x0), th.from_numpy(t), noise=nchw(noise))
    pairs = [(f"train {k}", getattr(lj, k), lt[k]) for k in ("loss", "mse", "vb")]
    pairs += [(f"bpd {k}", getattr(bj, k), v) for k, v in zip(("vb", "xstart_mse", "mse"), bt)]
    print("per-step terms, max |jax - torch| / max |jax|: " + ", ".join(
        f"{name} {np.abs(np.asarray(a) - b.detach().numpy()).max() / np.abs(np.asarray(a)).max():.1e}"
        for name, a, b in pairs))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=("check", "forward", "train", "sample", "nll"))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    th.set_num_threads(args.threads)
    th.manual_seed(0)
    np.random.seed(0)
    if args.mode == "check":
        return check(args)
    model = UNetModel(**CONFIG).train(args.mode == "train")
    diffusion = GaussianDiffusion(cosine_betas(NUM_TIMESTEPS))
    x_start = th.randint(0, 256, (args.batch, 3, 32, 32)).float() / 127.5 - 1  # image-like, in [-1, 1]
    state = {"x": th.randn(args.batch, 3, 32, 32), "t": NUM_TIMESTEPS}
    ts = th.randint(0, NUM_TIMESTEPS, (args.batch,))
    train_step = TrainStep(model, diffusion) if args.mode == "train" else None

    def next_t():  # p_sample_loop and calc_bpd_loop run t = T-1, ..., 0
        state["t"] = (state["t"] - 1) % NUM_TIMESTEPS
        return state["t"]

    @th.no_grad()
    def sample():  # one iteration of p_sample_loop_progressive
        state["x"] = diffusion.p_sample(model, state["x"], th.tensor([next_t()] * args.batch))["sample"]

    fn = {"forward": th.no_grad()(lambda: model(state["x"], ts)),
          "train": lambda: train_step(x_start),
          "sample": sample,
          "nll": lambda: diffusion.calc_bpd_step(model, x_start, th.tensor([next_t()] * args.batch))}[args.mode]
    for _ in range(args.warmup):
        fn()
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    print(f"torch {th.__version__} threads={th.get_num_threads()} mode={args.mode} batch={args.batch}: "
          f"median {1e3 * med:.1f} ms  min {1e3 * min(times):.1f} ms  (runs {args.runs}, warm-up {args.warmup})")
    if args.mode == "nll":
        print(f"implied calc_bpd_loop, T={NUM_TIMESTEPS}: {med * NUM_TIMESTEPS:.0f} s per {args.batch} images "
              f"({args.batch / (med * NUM_TIMESTEPS):.4f} images/s)")


if __name__ == "__main__":
    main()
