"""Stability margin of a Stable ResNet's steps: float parameter vs applied operator.

    python benchmarks/stability_margin.py [--model stable_resnet20] \
        [--weight_bits 4] [--h 0.1] [--seeds 0,1] [--output FILE.md]

Per block, at initialisation, ``h L ||·||₂²`` (L = 1, ReLU; stable when < 2)
of

* ``raw``: the float kernel parameter (what the old report used);
* the operator each form applies (``pdeq_jax.models.stable_resnet.
  stability_report``): practical form ``S₁^{1/2} K_q S₂^{1/2}`` with the
  standardised, quantized kernel ``K_q`` and the eval-mode BatchNorm factors,
  (a) with the initial running statistics (var 1) and (b) with statistics
  calibrated by ``--calib_passes`` train-mode forward passes on a fixed batch
  of N(0, 1) images (no parameter update); clean form ``K_q`` with its
  norm-tied step ``h_eff``.

Norms come from 200 power iterations on each block's input resolution.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pdeq_jax import layers  # noqa: E402
from pdeq_jax import models  # noqa: E402
from pdeq_jax.models import stable_resnet  # noqa: E402
from train import common  # noqa: E402


def calibrate(model, variables, bits, passes: int, batch: int, seed: int):
  """Running BN statistics after ``passes`` train-mode forward passes."""
  x = jax.random.normal(jax.random.PRNGKey(1000 + seed), (batch, 32, 32, 3))
  step = jax.jit(lambda v: model.apply(v, x, bits, train=True,
                                       mutable=["batch_stats"])[1])
  for _ in range(passes):
    variables = {**variables, **step(variables)}
  return variables


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="stable_resnet20")
  parser.add_argument("--weight_bits", type=int, default=4)
  parser.add_argument("--h", type=float, default=0.1)
  parser.add_argument("--seeds", default="0")
  parser.add_argument("--calib_passes", type=int, default=40)
  parser.add_argument("--calib_batch", type=int, default=64)
  parser.add_argument("--output", default="")
  args = parser.parse_args(argv)
  bits = layers.QuantBits.make(args.weight_bits, args.weight_bits)
  rows = []
  for seed in [int(s) for s in args.seeds.split(",")]:
    x = jnp.zeros((1, 32, 32, 3))
    practical = models.create(args.model, 10, h=args.h)
    clean = models.create(args.model, 10, h=args.h, clean_form=True)
    v_p = practical.init(jax.random.PRNGKey(seed), x, bits)
    v_c = clean.init(jax.random.PRNGKey(seed), x, bits)
    v_cal = calibrate(practical, v_p, bits, args.calib_passes,
                      args.calib_batch, seed)
    report = lambda v, **kw: stable_resnet.stability_report(
        v, args.weight_bits, h=args.h, **kw)
    for r_p, r_cal, r_c in zip(report(v_p), report(v_cal),
                               report(v_c, clean_form=True)):
      rows.append([seed, r_p["layer"], f"{r_p['raw_h_l_norm_sq']:.3f}",
                   f"{r_p['h_l_norm_sq']:.1f}", f"{r_cal['h_l_norm_sq']:.3f}",
                   f"{r_c['h_l_norm_sq']:.3f}", f"{r_c['h']:.5f}",
                   f"{r_c['h_l_norm_sq'] / r_c['h']:.0f}"])
      print(" | ".join(str(c) for c in rows[-1]), flush=True)
  header = ["seed", "block", "raw h‖K‖²", "practical h‖M‖², init stats",
            "practical h‖M‖², calibrated stats", "clean h_eff‖K_q‖²",
            "clean h_eff", "‖K_q‖²"]
  text = (f"{args.model}, {args.weight_bits}-bit weights, h = {args.h}, at "
          f"initialisation (`python benchmarks/stability_margin.py "
          f"{' '.join(argv if argv is not None else sys.argv[1:])}`).  "
          "Stable when < 2.  M = S₁^{1/2} K_q S₂^{1/2} (BN factors, eval "
          f"mode); calibrated: running statistics after {args.calib_passes} "
          f"train-mode passes over {args.calib_batch} N(0,1) images.\n\n"
          + common.markdown_table(header, rows))
  if args.output:
    with open(args.output, "w") as f:
      f.write(text)
  else:
    print(text)


if __name__ == "__main__":
  main()
