"""Guidance on real data: CFG and classifier guidance on the digits model.

Samples 10 images per class from `runs/digits` (EMA params) with
classifier-free guidance at scales 0, 1, 3 and with classifier guidance
(noisy classifier from `runs/digits_classifier`, applied to the model's
unconditional mode) at scales 0, 1, 5; writes one grid per setting to
`runs/guidance/` and prints how often a separately trained *clean* digits
classifier (logistic regression on the 8x8 pixels of the train split)
recognises the requested class.

  python train.py                                            # runs/digits
  python train.py --config=configs/digits_classifier.py      # runs/digits_classifier
  python scripts/digits_guidance.py
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusion_jax.runtime.xla_flags import set_cpu_flags  # noqa: E402
set_cpu_flags()  # XLA:CPU options, before JAX starts its backend
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from diffusion_jax import guidance, sampling, schedules  # noqa: E402
from diffusion_jax.data import pipeline  # noqa: E402
from diffusion_jax.generation import engine, images as image_files  # noqa: E402
from diffusion_jax.runtime import checkpoints  # noqa: E402


def clean_classifier(data_dir=None):
    """Logistic regression on uint8 pixels of the digits train split; returns (predict, test accuracy)."""
    from sklearn.linear_model import LogisticRegression

    def arrays(split):
        src = pipeline.make_source("digits", split, data_dir=data_dir)
        xs = np.stack([np.asarray(src[i]["image"], np.float32).reshape(-1) / 255.0 for i in range(len(src))])
        ys = np.array([int(src[i]["label"]) for i in range(len(src))])
        return xs, ys

    x_tr, y_tr = arrays("train")
    x_te, y_te = arrays("test")
    clf = LogisticRegression(max_iter=2000, C=1.0).fit(x_tr, y_tr)
    return (lambda u8: clf.predict(u8.reshape(len(u8), -1).astype(np.float32) / 255.0)), clf.score(x_te, y_te)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="runs/digits")
    ap.add_argument("--classifier_workdir", default="runs/digits_classifier")
    ap.add_argument("--out", default="runs/guidance")
    ap.add_argument("--respacing", default="100")
    ap.add_argument("--per_class", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    module, params, cfg = checkpoints.load_for_inference(args.workdir)
    d = cfg["diffusion"]
    sched = schedules.make_schedule(d["noise_schedule"], d["diffusion_steps"], args.respacing, d["rescale_timesteps"])
    n_cls = cfg["model"]["num_classes"]
    size, ch = cfg["model"]["image_size"], cfg["model"]["in_channels"]
    labels = jnp.repeat(jnp.arange(n_cls, dtype=jnp.int32), args.per_class)
    base = lambda x, t, y: module.apply({"params": params}, x, t, y)
    predict, clean_acc = clean_classifier()
    print(f"clean classifier accuracy on the real test split: {clean_acc:.3f}")
    results = {"clean_classifier_test_accuracy": clean_acc}

    settings = [(f"cfg_{s:g}", guidance.classifier_free(base, s, null_label=n_cls), None) for s in (0.0, 1.0, 3.0)]
    if os.path.exists(os.path.join(args.classifier_workdir, "config.json")):
        clf_module, clf_params, _ = checkpoints.load_for_inference(args.classifier_workdir)
        clf_fn = lambda x, t: clf_module.apply({"params": clf_params}, x, t)
        uncond = guidance.unconditional(base, null_label=n_cls)
        settings += [(f"classifier_{s:g}", uncond, guidance.classifier_cond_fn(clf_fn, s)) for s in (0.0, 1.0, 5.0)]
    else:
        print(f"no noisy classifier at {args.classifier_workdir}; skipping classifier guidance")

    os.makedirs(args.out, exist_ok=True)
    for name, model_fn, cond_fn in settings:
        def sample_fn(_, rng, ids, y, model_fn=model_fn, cond_fn=cond_fn):
            return sampling.p_sample_loop(rng, model_fn, sched, (ids.shape[0], size, size, ch),
                                          mean_type=d["mean_type"], var_type=d["var_type"], cond_fn=cond_fn, y=y,
                                          sample_ids=ids)

        images = engine.generate(sample_fn, len(labels), batch_size=len(labels), rng=jax.random.key(args.seed),
                                 conditioning=np.asarray(labels), log=None).images
        acc = float(np.mean(predict(images) == np.asarray(labels)))
        results[name] = acc
        image_files.write_png(os.path.join(args.out, f"{name}.png"), image_files.image_grid(images, nrow=args.per_class))
        print(f"{name:>14}: clean-classifier agreement with the requested class = {acc:.3f}", flush=True)
    with open(os.path.join(args.out, "accuracy.json"), "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
