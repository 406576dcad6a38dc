"""Stability margin of a Stable ResNet's steps: float parameter vs applied operator.

    python benchmarks/stability_margin.py [--model stable_resnet20] \
        [--weight_bits 4] [--h 0.1] [--seeds 0,1] [--output FILE.md]
    python benchmarks/stability_margin.py --workdir RUN [--which best] \
        [--output FILE.md]

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

With ``--workdir`` the same per-block report is made for a *trained* Stable
ResNet run instead (its ``best`` or ``final`` model, with its own h, weight
bits and running BN statistics; practical or clean form as it was trained).

Norms come from 200 power iterations on each block's input resolution.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pdeq_jax import layers  # noqa: E402
from pdeq_jax import models  # noqa: E402
from pdeq_jax.models import stable_resnet  # noqa: E402
from train import classify  # noqa: E402
from train import common  # noqa: E402


def calibrate(model, variables, bits, passes: int, batch: int, seed: int):
  """Running BN statistics after ``passes`` train-mode forward passes."""
  x = jax.random.normal(jax.random.PRNGKey(1000 + seed), (batch, 32, 32, 3))
  step = jax.jit(lambda v: model.apply(v, x, bits, train=True,
                                       mutable=["batch_stats"])[1])
  for _ in range(passes):
    variables = {**variables, **step(variables)}
  return variables


def trained_run_report(workdir: str, which: str, command: str) -> str:
  """Per-block applied margin of a finished Stable ResNet run."""
  config = classify.load_run_config(pathlib.Path(workdir))
  if not config.model.name.startswith("stable_"):
    raise ValueError(f"{workdir}: model {config.model.name!r} has no "
                     "symmetric steps (need a stable_* model)")
  variables = classify.load_source_variables(workdir, which)
  h = float(config.model.h)
  clean_form = bool(config.model.get("clean_form", False))
  weight_bits = config.quant.weight_bits
  rows = []
  for r in stable_resnet.stability_report(variables, weight_bits, h=h,
                                          clean_form=clean_form):
    rows.append([r["layer"], f"{r['raw_h_l_norm_sq']:.3f}",
                 f"{r['h_l_norm_sq']:.3f}", f"{r['h']:.5g}",
                 "yes" if r["stable"] else "**no**"])
    print(" | ".join(str(c) for c in rows[-1]), flush=True)
  form = "clean" if clean_form else "practical (BN)"
  return (f"{config.model.name} ({form} form), {weight_bits}-bit weights, "
          f"h = {h}, the {which} model of `{workdir}` (`python "
          f"benchmarks/stability_margin.py {command}`).  Stable when "
          "h‖M‖² < 2 (ReLU, L = 1); M = S₁^{1/2} K_q S₂^{1/2} with the run's "
          "eval-mode BN factors (practical form) or K_q (clean form).\n\n"
          + common.markdown_table(["block", "raw h‖K‖²", "applied h‖M‖²",
                                   "h", "stable"], rows))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="stable_resnet20")
  parser.add_argument("--weight_bits", type=int, default=4)
  parser.add_argument("--h", type=float, default=0.1)
  parser.add_argument("--seeds", default="0")
  parser.add_argument("--calib_passes", type=int, default=40)
  parser.add_argument("--calib_batch", type=int, default=64)
  parser.add_argument("--output", default="")
  parser.add_argument("--workdir", default="",
                      help="a finished Stable ResNet run: report its trained "
                      "model instead of fresh initialisations")
  parser.add_argument("--which", default="best", choices=["best", "final"])
  args = parser.parse_args(argv)
  command = " ".join(argv if argv is not None else sys.argv[1:])
  text = (trained_run_report(args.workdir, args.which, command)
          if args.workdir else initialisation_report(args, command))
  if args.output:
    common.write_text(args.output, text)
  else:
    print(text)


def initialisation_report(args: argparse.Namespace, command: str) -> str:
  """Per-block margins of fresh initialisations, one row per seed and block."""
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
  return (f"{args.model}, {args.weight_bits}-bit weights, h = {args.h}, at "
          f"initialisation (`python benchmarks/stability_margin.py "
          f"{command}`).  "
          "Stable when < 2.  M = S₁^{1/2} K_q S₂^{1/2} (BN factors, eval "
          f"mode); calibrated: running statistics after {args.calib_passes} "
          f"train-mode passes over {args.calib_batch} N(0,1) images.\n\n"
          + common.markdown_table(header, rows))


if __name__ == "__main__":
  main()
