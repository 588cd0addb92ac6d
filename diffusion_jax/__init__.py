"""diffusion_jax: Improved DDPM / ADM / classifier-free guidance / GLIDE in JAX.

Layers (imports run one way only):
  math           schedules, gaussian, likelihood, objectives, sampling, guidance
  models         models/ (Flax modules; no diffusion math)
  orchestration  data/, parallel, train_lib, checkpoints, evaluation/, convert
"""

__version__ = "0.1.0"
