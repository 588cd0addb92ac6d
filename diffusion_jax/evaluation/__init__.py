"""Checkpoint evaluation: exact NLL in bits/dim and sample metrics.

  nll        full-chain bits/dim (OpenAI's calc_bpd_loop terms, chunked over t,
             sharded over devices) and `make_nll_estimator`, an unbiased
             K-timestep importance-sampled estimate for logging in training
  metrics    FID, sFID, Inception Score, precision/recall (guided-diffusion's
             evaluator definitions) over any feature space
  inception  Flax FID Inception-v3 (pytorch-fid weights)
  run        what `evaluate.py` runs: resumable NLL loop, reports
  ode_run    `evaluate.py --metric=ode_nll`: probability-flow ODE bits/dim
             (math in `diffusion_jax.ode_likelihood`), sharded, resumable
"""

from diffusion_jax.evaluation.nll import (
    make_chain_fn,
    make_mesh,
    make_nll_estimator,
    proposal_from_profile,
)

__all__ = ["make_chain_fn", "make_mesh", "make_nll_estimator", "proposal_from_profile"]
