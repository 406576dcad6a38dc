"""Clean-form Stable ResNet: fixed step h vs the step tied to the applied kernel.

    python benchmarks/clean_form_step.py --workdir DIR [--model stable_resnet20] \
        [--precision 4w4a] [--max_train 4000] [--epochs 3] [--seed 0]

Trains the clean form (plain Eq. 15, ``clean_form=True``) of ``--model`` on
CIFAR-10 (the offline JPEG copy, ``configs/cifar.py`` with ``,cpu``) twice,
directly at ``--precision`` (no gradual schedule): with the fixed ``h``
(``max_h_norm_sq=None``) and with the default norm-tied step
(``max_h_norm_sq=1``), and prints the test accuracy and the clip-only
accuracy of each, with the applied margin ``h ||K_q||₂²`` of the selected
weights (``stable_resnet.stability_report``).  A CPU-sized check, not a
converged result.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import cifar  # noqa: E402
from pdeq_jax.models import stable_resnet  # noqa: E402
from train import classify  # noqa: E402
from train import common  # noqa: E402


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--model", default="stable_resnet20")
  parser.add_argument("--precision", default="4w4a")
  parser.add_argument("--max_train", type=int, default=4000)
  parser.add_argument("--epochs", type=int, default=3)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  rows = []
  for label, max_h_norm_sq in (("fixed h", None), ("norm-tied", 1.0)):
    config = cifar.get_config(f"{args.model},cifar10_jpeg,{args.precision},cpu")
    config.seed = args.seed
    config.num_epochs = args.epochs
    config.quant.gradual = False
    config.data.max_train = args.max_train
    config.model.clean_form = True
    config.model.max_h_norm_sq = max_h_norm_sq
    workdir = os.path.join(args.workdir, label.replace(" ", "_"))
    r = classify.train_and_evaluate(config, workdir, verbose=False)
    variables = classify.load_source_variables(workdir, "best")
    margins = [row["h_l_norm_sq"] for row in stable_resnet.stability_report(
        variables, int(config.quant.weight_bits), h=config.model.h,
        clean_form=True, max_h_norm_sq=max_h_norm_sq, iters=100)]
    c = r.get("consistency", {})
    rows.append([label, f"{100 * r['test_acc']:.2f}",
                 f"{100 * c.get('test_acc_clip_only', float('nan')):.2f}",
                 f"{min(margins):.3g}-{max(margins):.3g}",
                 f"{r['train_seconds_this_call']:.0f}"])
    print(json.dumps(rows[-1]), flush=True)
  print(common.markdown_table(
      ["step", "test acc %", "clip-only acc %", "h‖K_q‖² per block (selected)",
       "train s"], rows))


if __name__ == "__main__":
  main()
