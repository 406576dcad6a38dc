"""Tables of the PTQ study from the ``formats.json`` files of ``train.ptq``.

    python -m benchmarks.ptq_study results/ptq > results/ptq/tables.md

Reads ``<root>/<model>/<search>/formats.json`` and prints, per model, the
sequential / independent / uniform-8 rows (accuracy drop, memory and
multiplication cost vs all-8-bit, search time) and the mean bits per layer
kind of each result (the stable-vs-standard comparison; biases "float"
unless the run quantized them, ``train.ptq --biases``).
"""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np

from train import common


def load(root: pathlib.Path):
  runs = {}
  for path in sorted(root.glob("*/*/formats.json")):
    runs.setdefault(path.parent.parent.name, {})[path.parent.name] = \
        json.loads(path.read_text())
  return runs


def main(argv):
  if len(argv) != 2:
    raise SystemExit("usage: python -m benchmarks.ptq_study <results/ptq>")
  root = pathlib.Path(argv[1])
  if not root.is_dir():
    raise SystemExit(f"error: {root} is not a directory")
  runs = load(root)
  rows, bits_rows = [], []
  for model, searches in runs.items():
    for search in ("sequential", "independent", "uniform8"):
      if search not in searches:
        continue
      s = searches[search]["summary"]
      rows.append([model, search, f"{s['float_val_acc']:.2f}",
                   f"{s['val_drop']:+.2f}", f"{s['float_test_acc']:.2f}",
                   f"{s['test_drop']:+.2f}", f"{s['memory_kib']:.1f}",
                   f"{s['memory_vs_8bit']:+.1%}", f"{s['mult_cost']:.3g}",
                   f"{s['mult_vs_8bit']:+.1%}", f"{s['search_seconds']:.0f}",
                   s["evaluations"], s["val_examples"] or "all"])
      formats = searches[search]["formats"]
      w = [f["bw"] or 32 for f in formats if f["kind"] == "weight"]
      a = [f["bw"] or 32 for f in formats if f["kind"] == "act"]
      b = [f["bw"] or 32 for f in formats if f["kind"] == "bias"]
      bits_rows.append([model, search, len(w), f"{np.mean(w):.2f}",
                        f"{min(w)}-{max(w)}", len(a), f"{np.mean(a):.2f}",
                        f"{min(a)}-{max(a)}",
                        f"{np.mean(b):.2f}" if b else "float"])
  print("## Accuracy and cost (drops in % points; costs vs all-8-bit)\n")
  print(common.markdown_table(
      ["model", "search", "float val", "val drop", "float test",
       "test drop", "weight KiB", "memory vs 8b", "mult cost",
       "mult vs 8b", "search s", "evals", "val examples"], rows))
  print("## Bits per tensor kind (float counted as 32)\n")
  print(common.markdown_table(
      ["model", "search", "weight tensors", "mean BW_w", "range",
       "activations", "mean BW_a", "range", "mean BW_bias"], bits_rows))


if __name__ == "__main__":
  main(sys.argv)
