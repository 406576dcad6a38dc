"""The authors' PyTorch networks vs pdeq-jax: same data, same schedule.

    python benchmarks/authors_compare.py --authors_code=<checkout> \
        --workdir=workdirs/authors_compare [--models=resnet20,stable_resnet20] \
        [--precision=4w4a] [--seeds=2] [--num_epochs=10] [--max_train=5000] \
        [--start_bits=8] [--epochs_per_step=1]

Issue 15, Part 1.  ``--authors_code`` is a checkout of
BGUCompSci/CNNQuantizationThroughPDEs; only its ``nets/`` (and
``net_components/``) are imported, through
``benchmarks/train_throughput.authors_lib``, never copied.  Both
implementations train on exactly the same batches: the offline CIFAR-10 JPEG
copy, the same class-balanced training subset and validation split, and the
batches (order, random crop + flip, normalisation) of the pdeq-jax trainer's
data source, which the PyTorch loop reads too.  That is the only adaptation
of the authors' side: their ``stable_exp.py`` loop (SGD with momentum 0.9,
weight decay 1e-4 on every parameter, cosine learning rate, batch 128,
gradual quantization one bit less every ``epochs_per_step`` epochs, the best
validation model tested) is followed by the loop below with pdeq-jax's
schedule functions, so the learning rate (cosine per step, as pdeq-jax) and
the bits of every epoch are identical on both sides.  Their loop steps the
cosine once per epoch and lowers the bits after epochs 10, 20, ... (one epoch
later than ``quant.bit_schedule``); over the short schedules here both would
only add a difference that is not the networks'.

Model selection on both sides: the best validation accuracy among the epochs
trained at the target bits.  The consistency statistics (Tables 4/5, Fig. 3)
are computed with the same function (``pdeq_jax.consistency``) on both
sides: the same weights with b-bit and with clip-only activations (the
authors' quantizer at 32 bits), the MSE between every block's output, and
that MSE divided by the block's clip-only mean square (normalised).

Writes ``authors_compare.md`` (and ``.json``) to ``--workdir``: per network
and implementation, test accuracy, clip-only accuracy, mean and per-block MSE
and normalised MSE (mean ± sample std over seeds), and whether the stable
net's per-block MSE is below the standard net's in each implementation.
A killed run resumes: pdeq-jax runs from their checkpoints, the PyTorch runs
from a checkpoint written after every epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time
from typing import Any, Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import train_throughput  # noqa: E402
from configs import cifar  # noqa: E402
from pdeq_jax import consistency  # noqa: E402
from train import classify  # noqa: E402
from train import common  # noqa: E402

CLIP_ONLY_BITS = 32
KINDS = {"resnet": "resnet", "stable_resnet": "stable"}


def make_config(model: str, seed: int, args) -> Any:
  config = cifar.get_config(f"{model},cifar10_jpeg,{args.precision},cpu")
  config.seed = seed
  config.num_epochs = args.num_epochs
  config.quant.start_bits = args.start_bits
  config.quant.epochs_per_step = args.epochs_per_step
  config.data.max_train = args.max_train
  config.data.val_fraction = args.val_fraction
  config.consistency.max_examples = args.consistency_examples
  classify.check_config(config)
  return config


def kind_of(model: str) -> str:
  return "stable" if model.startswith("stable_") else "resnet"


# ---------------------------------------------------------------- pdeq-jax --

def run_ours(config, run_dir: pathlib.Path, dataset) -> Dict[str, Any]:
  r = common.run_or_load(classify, config, run_dir, verbose=False,
                         dataset=dataset)
  c = r["consistency"]
  return {"test_acc": r["test_acc"], "clip_only_acc": c["test_acc_clip_only"],
          "best_epoch": r["best_epoch"], "mse": list(c["mse"]),
          "normalized_mse": list(c["normalized_mse"]),
          "wall_seconds": r.get("wall_seconds", float("nan"))}


# ---------------------------------------------------- the authors' networks --

def _bits(config, epoch: int):
  bits = common.bits_for_epoch(config, epoch)
  return tuple(min(int(b), CLIP_ONLY_BITS) for b in bits)


def _set_bits(net, weight_bits: int, act_bits: int) -> None:
  net.set_quantize_weights(weight_bits)
  net.set_quantize_activations(act_bits)


def _to_torch(torch, images: np.ndarray):
  return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def _accuracy(torch, net, batches) -> float:
  correct = total = 0.0
  net.eval()
  with torch.no_grad():
    for x, y, mask in batches:
      pred = net(_to_torch(torch, x)).argmax(1).numpy()
      correct += float(np.sum((pred == y) * mask))
      total += float(np.sum(mask))
  return correct / max(total, 1.0)


def _block_outputs(torch, net, x) -> List[np.ndarray]:
  net.return_layer_activations = "all"
  try:
    _, hidden = net(_to_torch(torch, x))
  finally:
    net.return_layer_activations = False
  return [h.permute(0, 2, 3, 1).numpy() for h in hidden]


def authors_consistency(torch, net, config, batches) -> Dict[str, Any]:
  """b-bit vs clip-only activations of the same weights, as pdeq-jax's."""
  weight_bits, act_bits = _bits(config, config.num_epochs - 1)
  totals, correct_q, correct_r, count = None, 0.0, 0.0, 0.0
  net.eval()
  with torch.no_grad():
    for x, y, mask in batches:
      _set_bits(net, weight_bits, act_bits)
      logits_q = net(_to_torch(torch, x)).numpy()
      hidden_q = _block_outputs(torch, net, x)
      _set_bits(net, weight_bits, CLIP_ONLY_BITS)
      logits_r = net(_to_torch(torch, x)).numpy()
      hidden_r = _block_outputs(torch, net, x)
      sums = consistency.squared_error_sums(
          [jnp.asarray(h) for h in hidden_q], [jnp.asarray(h) for h in hidden_r],
          jnp.asarray(mask))
      totals = sums if totals is None else {
          k: totals[k] + sums[k] for k in totals}
      correct_q += float(np.sum((logits_q.argmax(1) == y) * mask))
      correct_r += float(np.sum((logits_r.argmax(1) == y) * mask))
      count += float(np.sum(mask))
  _set_bits(net, weight_bits, act_bits)
  stats = consistency.mse_from_sums(totals)
  return {"test_acc_bits": correct_q / count,
          "test_acc_clip_only": correct_r / count,
          "mse": [float(v) for v in np.asarray(stats["mse"])],
          "normalized_mse": [float(v) for v in
                             np.asarray(stats["normalized_mse"])]}


def run_authors(lib, config, run_dir: pathlib.Path, dataset,
                threads: int) -> Dict[str, Any]:
  results_file = run_dir / "results.json"
  if results_file.exists():
    return json.loads(results_file.read_text())
  torch = train_throughput.torch_lib().torch
  torch.set_num_threads(threads)
  torch.manual_seed(int(config.seed))
  model = classify.create_model(config, 10)
  weight_bits, act_bits = _bits(config, 0)
  net = train_throughput.build_authors_net(
      lib, model, kind_of(config.model.name),
      f"{config.quant.weight_bits}w{config.quant.act_bits}a")
  optimizer = torch.optim.SGD(net.parameters(), lr=config.optim.lr,
                              momentum=config.optim.momentum,
                              weight_decay=config.optim.weight_decay)
  source = classify.make_source(config, dataset)
  batch = int(config.batch_size)
  steps_per_epoch = source.num_examples("train") // batch
  schedule = classify.learning_rate_schedule(config, steps_per_epoch)
  run_dir.mkdir(parents=True, exist_ok=True)
  checkpoint = run_dir / "checkpoint.pt"
  state = {"epoch": 0, "best_val": -1.0, "best_epoch": -1, "best": None,
           "seconds": 0.0}
  if checkpoint.exists():
    saved = torch.load(checkpoint, weights_only=False)
    net.load_state_dict(saved["net"])
    optimizer.load_state_dict(saved["optimizer"])
    state = saved["state"]
    print(f"  resumed {run_dir} at epoch {state['epoch']}", flush=True)
  for epoch in range(state["epoch"], int(config.num_epochs)):
    t0 = time.perf_counter()
    weight_bits, act_bits = _bits(config, epoch)
    _set_bits(net, weight_bits, act_bits)
    net.train()
    for i, (x, y) in enumerate(source.train_batches(batch, int(config.seed),
                                                    epoch)):
      for group in optimizer.param_groups:
        group["lr"] = float(schedule(epoch * steps_per_epoch + i))
      loss = torch.nn.functional.cross_entropy(
          net(_to_torch(torch, x)), torch.from_numpy(np.asarray(y, np.int64)))
      optimizer.zero_grad()
      loss.backward()
      optimizer.step()
    val_acc = _accuracy(torch, net, source.eval_batches(
        "val", int(config.eval_batch_size)))
    at_target = common.at_target_bits(config,
                                      common.bits_for_epoch(config, epoch))
    if at_target and val_acc > state["best_val"]:
      state.update(best_val=val_acc, best_epoch=epoch,
                   best={k: v.clone() for k, v in net.state_dict().items()})
    state["epoch"] = epoch + 1
    state["seconds"] += time.perf_counter() - t0
    torch.save({"net": net.state_dict(), "optimizer": optimizer.state_dict(),
                "state": state}, checkpoint)
    print(f"  authors {config.model.name} seed {config.seed} epoch "
          f"{epoch + 1}/{config.num_epochs} bits {weight_bits}W{act_bits}A "
          f"loss {float(loss):.3f} val {100 * val_acc:.2f}%", flush=True)
  net.load_state_dict(state["best"])
  stats = authors_consistency(torch, net, config, source.eval_batches(
      "test", int(config.eval_batch_size),
      int(config.consistency.max_examples)))
  test_acc = _accuracy(torch, net, source.eval_batches(
      "test", int(config.eval_batch_size)))
  result = {"test_acc": test_acc, "clip_only_acc": stats["test_acc_clip_only"],
            "best_epoch": state["best_epoch"], "mse": stats["mse"],
            "normalized_mse": stats["normalized_mse"],
            "wall_seconds": state["seconds"]}
  common.write_json(results_file, result)
  checkpoint.unlink()
  return result


# ------------------------------------------------------------------ report --

def _mean_std(values: List[float], scale: float = 1.0, digits: int = 2) -> str:
  v = np.asarray(values, np.float64) * scale
  std = f"{v.std(ddof=1):.{digits}f}" if v.size > 1 else "–"
  return f"{v.mean():.{digits}f} ± {std}"


def report(runs: Dict[tuple, List[Dict[str, Any]]], args) -> str:
  lines = [
      f"Same data and schedule: CIFAR-10 JPEG copy, {args.max_train} "
      f"class-balanced training images, validation fraction "
      f"{args.val_fraction}, {args.num_epochs} epochs, {args.precision} with "
      f"the gradual schedule from {args.start_bits} bits (one bit less every "
      f"{args.epochs_per_step} epoch(s)), SGD 0.9 / lr 0.1 cosine / wd 1e-4 / "
      f"batch 128; consistency on {args.consistency_examples or 'all'} test "
      f"images.  Mean ± sample std (ddof = 1) over seeds "
      f"{list(range(args.seeds))}.", "",
      "| network | implementation | test acc % | clip-only acc % | mean block "
      "MSE | mean block RMSE | mean normalised MSE | normalised MSE, last "
      "block | s / run |",
      "|---|---|---|---|---|---|---|---|---|"]
  for (model, impl), rs in runs.items():
    lines.append(
        f"| {model} | {impl} | {_mean_std([r['test_acc'] for r in rs], 100)} "
        f"| {_mean_std([r['clip_only_acc'] for r in rs], 100)} "
        f"| {_mean_std([np.mean(r['mse']) for r in rs], 1, 4)} "
        f"| {_mean_std([np.mean(np.sqrt(r['mse'])) for r in rs], 1, 4)} "
        f"| {_mean_std([np.mean(r['normalized_mse']) for r in rs], 1, 4)} "
        f"| {_mean_std([r['normalized_mse'][-1] for r in rs], 1, 4)} "
        f"| {np.mean([r['wall_seconds'] for r in rs]):.0f} |")
  for key, title in (("mse", "Per-block MSE"),
                     ("normalized_mse", "Per-block normalised MSE")):
    blocks = None
    rows = []
    for (model, impl), rs in runs.items():
      curve = np.mean([r[key] for r in rs], axis=0)
      blocks = len(curve)
      rows.append(f"| {model} | {impl} | " +
                  " | ".join(f"{v:.4f}" for v in curve) + " |")
    if blocks:
      lines += ["", f"{title} (mean over seeds):", "",
                "| network | implementation | " +
                " | ".join(str(b + 1) for b in range(blocks)) + " |",
                "|---|---|" + "---|" * blocks] + rows
  # ordering: is the stable net's MSE below the standard net's, block by block?
  standard = [m for m in args.models if not m.startswith("stable_")]
  stable = [m for m in args.models if m.startswith("stable_")]
  if standard and stable:
    lines += ["", f"Ordering, {stable[0]} vs {standard[0]} (blocks where the "
              "stable net's MSE is lower; the RMSE of the authors' published "
              "curves orders as the MSE):", ""]
    for impl in ("pdeq-jax", "authors"):
      a, b = runs.get((stable[0], impl)), runs.get((standard[0], impl))
      if not a or not b:
        continue
      for key in ("mse", "normalized_mse"):
        lower = np.mean([r[key] for r in a], 0) < np.mean([r[key] for r in b],
                                                          0)
        lines.append(f"- {impl}, {key}: {int(lower.sum())}/{lower.size} "
                     f"blocks ({''.join('<' if v else '>' for v in lower)})")
  return "\n".join(lines) + "\n"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--authors_code", required=True,
                      help="checkout of BGUCompSci/CNNQuantizationThroughPDEs")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--models", default="resnet20,stable_resnet20")
  parser.add_argument("--implementations", default="pdeq-jax,authors")
  parser.add_argument("--precision", default="4w4a")
  parser.add_argument("--seeds", type=int, default=2)
  parser.add_argument("--num_epochs", type=int, default=10)
  parser.add_argument("--max_train", type=int, default=5000)
  parser.add_argument("--val_fraction", type=float, default=0.04)
  parser.add_argument("--start_bits", type=int, default=8)
  parser.add_argument("--epochs_per_step", type=int, default=1)
  parser.add_argument("--consistency_examples", type=int, default=2000)
  parser.add_argument("--threads", type=int, default=2)
  args = parser.parse_args(argv)
  args.models = [m.strip() for m in args.models.split(",") if m.strip()]
  impls = [i.strip() for i in args.implementations.split(",") if i.strip()]
  for impl in impls:
    if impl not in ("pdeq-jax", "authors"):
      parser.error(f"--implementations: unknown {impl!r} (allowed: pdeq-jax, "
                   f"authors)")
  lib = None
  if "authors" in impls:
    lib = train_throughput.authors_lib(args.authors_code)
    if lib is None:
      parser.error(f"--authors_code={args.authors_code!r}: no nets/resnet.py "
                   f"there (a checkout of BGUCompSci/CNNQuantizationThroughPDEs"
                   f" is needed)")
  configs = {(m, s): make_config(m, s, args) for m in args.models
             for s in range(args.seeds)}  # all checked before any training
  first = next(iter(configs.values()))
  dataset = classify.load_data(first)
  workdir = pathlib.Path(args.workdir)
  runs: Dict[tuple, List[Dict[str, Any]]] = {}
  for model in args.models:
    for impl in impls:
      for seed in range(args.seeds):
        config = configs[(model, seed)]
        run_dir = workdir / impl / model / f"seed{seed}"
        t0 = time.perf_counter()
        r = (run_ours(config, run_dir, dataset) if impl == "pdeq-jax" else
             run_authors(lib, config, run_dir, dataset, args.threads))
        print(f"{model} {impl} seed {seed}: test {100 * r['test_acc']:.2f}% "
              f"clip-only {100 * r['clip_only_acc']:.2f}% mean MSE "
              f"{np.mean(r['mse']):.4f} normalised "
              f"{np.mean(r['normalized_mse']):.4f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        runs.setdefault((model, impl), []).append(r)
        text = report(runs, args)
        common.write_text(workdir / "authors_compare.md", text)
  common.write_json(workdir / "authors_compare.json",
                    {f"{m}|{i}": rs for (m, i), rs in runs.items()})
  print(text)


if __name__ == "__main__":
  main()
