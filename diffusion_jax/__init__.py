"""diffusion_jax: Improved DDPM / ADM / classifier-free guidance / GLIDE in JAX.

Layers (imports run one way only; a lower layer never imports a higher one):
  math           schedules, gaussian, likelihood, objectives, sampling, guidance, text
  models         models/ (Flax modules; no diffusion math)
  orchestration  convert/ (OpenAI checkpoints), runtime/ (mesh, checkpoints, the
                 config file, model kinds), data/, and one folder per program:
                 training/ (train.py), generation/ (sample.py), evaluation/ (evaluate.py)

Importing the package changes nothing global; the programs call
`diffusion_jax.runtime.xla_flags.set_cpu_flags()` before JAX starts.
"""

__version__ = "0.1.0"
