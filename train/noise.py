"""Accuracy of a finished run under hardware noise (FQ-Conv's analysis).

    python -m train.noise --workdir=<run> --sites=weights,activations,mac \
        --sigmas=0,0.01,0.02,0.05,0.1 [--draws=3] [--max_examples=0] \
        [--seed=0] [--output=<dir>]

The run's selected (best-validation; ``--which=final``: the final) model
is evaluated on the test set with
Gaussian noise at each site alone (:mod:`pdeq_jax.noise`: weights relative
to each layer's max|w|, activations relative to each quantizer's alpha, MAC
outputs relative to each output's max|y|), ``--draws`` independent noise
draws per sigma (common random numbers across sigmas: draw ``d`` uses the
same key at every sigma).  One compilation serves every sigma.  Writes
``noise.json``, ``noise.md`` (mean ± std per sigma and the sigma at which
the mean accuracy has fallen by 1, 5 and 20 points, linearly interpolated)
and ``noise.png`` into ``--output`` (default: the workdir).

Works for image-classification runs (``train.classify``: float runs too,
for the weight and MAC sites) and for PDE-GCN runs (``train.node_classify``).

    python -m train.noise --compare=a/noise.json,b/noise.json \
        --labels=ResNet-20,Stable --output=<dir>

puts several runs' curves on one plot per site (``compare.png``) and their
thresholds in one table (``compare.md``).
"""

from __future__ import annotations

import functools
import json
import pathlib
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from pdeq_jax import noise
from train import cli
from train import common
from train import validate

FLAGS = flags.FLAGS
DROPS = (1, 5, 20)  # accuracy points


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  fv = {"flag_values": flag_values}
  flags.DEFINE_string("workdir", None, "A finished run.", **fv)
  flags.DEFINE_string("sites", ",".join(noise.SITES),
                      "Comma list of noise sites.", **fv)
  flags.DEFINE_string("sigmas", "0,0.005,0.01,0.02,0.05,0.1,0.2",
                      "Comma list of relative noise stds (>= 0).", **fv)
  flags.DEFINE_integer("draws", 3, "Noise draws per sigma.", **fv)
  flags.DEFINE_integer("max_examples", 0,
                       "Test images (0: all; else a class-balanced subset).",
                       **fv)
  flags.DEFINE_integer("seed", 0, "Seed of the noise stream.", **fv)
  flags.DEFINE_enum("which", "best", ["best", "final"],
                    "The selected (best-validation) or the final model.",
                    **fv)
  flags.DEFINE_string("output", None, "Output directory (default: workdir).",
                      **fv)
  flags.DEFINE_list("compare", None, "noise.json files to put on one plot.",
                    **fv)
  flags.DEFINE_list("labels", None, "Labels of the --compare runs.", **fv)


# -------------------------------------------------------------- evaluators ---

class Evaluator:
  """``accuracy(sigmas, key) -> float`` of a run's selected model on the test
  set, plus what the run is (for the report)."""

  def __init__(self, accuracy: Callable[[noise.Sigmas, jax.Array], float],
               config: Any, description: str, has_act_quant: bool,
               examples: int):
    self.accuracy, self.config = accuracy, config
    self.description, self.has_act_quant = description, has_act_quant
    self.examples = examples


def _image_evaluator(workdir: pathlib.Path, config, max_examples: int,
                     which: str = "best") -> Evaluator:
  from pdeq_jax.models import scan_blocks  # pylint: disable=import-outside-toplevel
  from train import classify  # pylint: disable=import-outside-toplevel
  source = classify.make_source(config)
  variables = classify.load_source_variables(str(workdir), which)
  if config.model.get("scan_blocks", False):
    # scanned blocks share one module path: unroll so every block draws
    # its own noise
    variables = scan_blocks.unstack_blocks(variables)
    config = config.copy_and_resolve_references()
    config.model.scan_blocks = False
  variables = jax.tree_util.tree_map(jnp.asarray, variables)
  model = classify.create_model(config, source.num_classes)
  bits = classify.bits_for_epoch(config, int(config.num_epochs) - 1)
  batches = [tuple(jnp.asarray(a) for a in b) for b in source.eval_batches(
      "test", int(config.eval_batch_size), max_examples)]

  @jax.jit
  def step(sigmas, key, variables, x, y, mask):
    with noise.inject(sigmas, key):
      logits = model.apply(variables, x, bits, train=False)
    correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
    return jnp.sum(correct * mask), jnp.sum(mask)

  def accuracy(sigmas, key) -> float:
    correct = count = 0.0
    for i, (x, y, mask) in enumerate(batches):
      c, n = step(sigmas, jax.random.fold_in(key, i), variables, x, y, mask)
      correct, count = correct + float(c), count + float(n)
    return correct / count

  examples = int(sum(float(jnp.sum(b[2])) for b in batches))
  return Evaluator(accuracy, config,
                   f"{config.model.name} {_precision(config)} on "
                   f"{config.data.name}", int(config.quant.act_bits) != 32,
                   examples)


def _node_evaluator(workdir: pathlib.Path, config, which: str = "best"
                    ) -> Evaluator:
  from train import node_classify  # pylint: disable=import-outside-toplevel
  task = node_classify.load_task(config)
  model = node_classify.create_model(config, task.num_classes)
  params = node_classify.init_params(config, model, task)
  tx = node_classify.create_optimizer(config, params)
  ckpt = common.Checkpointer(workdir / "checkpoints")
  state = ckpt.restore(node_classify.initial_state(config, params, tx))
  ckpt.close()
  if which == "best" and int(state["best"]["epoch"]) < 0:
    raise ValueError(f"{workdir}: the run has selected no model yet (no "
                     "epoch at the target bits was evaluated)")
  params = jax.tree_util.tree_map(
      jnp.asarray, state["best"]["params"] if which == "best"
      else state["params"])
  bits = node_classify.bits_for_epoch(config, int(config.num_epochs) - 1)

  @jax.jit
  def step(sigmas, key, params, task):
    with noise.inject(sigmas, key):
      logits = model.apply({"params": params}, task.features, task.graph,
                           bits)
    return node_classify._accuracy(logits, task.labels, task.test_idx)  # pylint: disable=protected-access

  form = "sym" if config.model.symmetric else "non-sym"
  return Evaluator(lambda s, k: float(step(s, k, params, task)), config,
                   f"PDE-GCN {form} {_precision(config)} on "
                   f"{config.data.name}",
                   int(config.quant.act_bits) != 32,
                   int(task.test_idx.shape[0]))


def _precision(config) -> str:
  w, a = int(config.quant.weight_bits), int(config.quant.act_bits)
  return "FP" if (w, a) == (32, 32) else f"{w}W{a}A"


def load_evaluator(workdir: str, max_examples: int = 0,
                   which: str = "best") -> Evaluator:
  from train import classify  # pylint: disable=import-outside-toplevel
  workdir = pathlib.Path(workdir)
  config = classify.load_run_config(workdir)
  if config.task == "image_classification":
    return _image_evaluator(workdir, config, max_examples, which)
  if config.task == "node_classification":
    return _node_evaluator(workdir, config, which)
  raise validate.ConfigError(
      "noise evaluation supports classification runs", "config.task",
      config.task, "allowed: image_classification, node_classification")


# ------------------------------------------------------- noise training ---

def check_train_config(config, prefix: str = "config") -> None:
  """``config.noise`` (optional block): clear errors for bad values."""
  n = config.get("noise")
  if n is None or not n.get("train_sites"):
    return
  field = f"{prefix}.noise"
  try:
    sites = noise.check_sites(n.train_sites, f"{field}.train_sites")
  except ValueError as e:
    raise validate.ConfigError(
        "bad noise sites", f"{field}.train_sites", n.train_sites,
        f"allowed: a comma list of {', '.join(noise.SITES)} ({e})") from None
  validate.positive(n.train_sigma, f"{field}.train_sigma",
                    "the training noise sigma must be positive")
  epochs = int(config.num_epochs)
  if isinstance(n.train_epochs, bool) or not isinstance(
      n.train_epochs, int) or not 1 <= n.train_epochs <= epochs:
    raise validate.ConfigError(
        "noise epochs out of range", f"{field}.train_epochs", n.train_epochs,
        f"allowed: an integer in [1, num_epochs = {epochs}]")
  if isinstance(n.ramp_epochs, bool) or not isinstance(
      n.ramp_epochs, int) or not 0 <= n.ramp_epochs <= n.train_epochs:
    raise validate.ConfigError(
        "noise ramp out of range", f"{field}.ramp_epochs", n.ramp_epochs,
        f"allowed: an integer in [0, train_epochs = {n.train_epochs}]")
  if "activations" in sites and int(config.quant.act_bits) == 32:
    raise validate.ConfigError(
        "activation noise is relative to the quantizers' alpha and this run "
        "has float activations", f"{field}.train_sites", n.train_sites,
        "allowed here: weights, mac")
  if config.model.get("scan_blocks", False):
    raise validate.ConfigError(
        "noise-aware training needs unrolled blocks (scanned blocks share "
        "one noise draw)", f"{prefix}.model.scan_blocks", True,
        "allowed: False")


def training_noise(config, steps_per_epoch: int):
  """None (no noise training), or ``(sites, fn)`` with ``fn(step) ->
  (Sigmas, key)``: sigma 0 before the final ``train_epochs`` epochs, then a
  linear ramp over ``ramp_epochs`` epochs to ``train_sigma``; the key is
  ``fold_in(fold_in(PRNGKey(seed), 2), step)`` (stream 2: 0 is the
  initialisation, 1 dropout), so a resumed run draws the same noise."""
  check_train_config(config)
  n = config.get("noise")
  if n is None or not n.get("train_sites"):
    return None
  sites = noise.check_sites(n.train_sites)
  start = (int(config.num_epochs) - int(n.train_epochs)) * steps_per_epoch
  ramp = int(n.ramp_epochs) * steps_per_epoch
  sigma = float(n.train_sigma)
  base = jax.random.fold_in(jax.random.PRNGKey(int(config.seed)), 2)

  def fn(step):
    sigmas = noise.train_sigmas(step, sites, sigma=sigma, start_step=start,
                                ramp_steps=ramp)
    return sigmas, jax.random.fold_in(base, jnp.asarray(step, jnp.uint32))
  return sites, fn




# ------------------------------------------------------------------ sweep ---

def threshold(sigmas: Sequence[float], means: Sequence[float], drop: float
              ) -> Optional[float]:
  """The smallest sigma at which the mean accuracy (in [0, 1]) has fallen by
  ``drop`` points below its value at sigma = ``sigmas[0]``, linearly
  interpolated between the grid points; None if it never falls that far."""
  target = means[0] - drop / 100.0
  for i in range(1, len(sigmas)):
    if means[i] <= target:
      s0, s1, a0, a1 = sigmas[i - 1], sigmas[i], means[i - 1], means[i]
      if a0 == a1:
        return float(s1)
      return float(s0 + (a0 - target) / (a0 - a1) * (s1 - s0))
  return None


def sweep(evaluator: Evaluator, sites: Sequence[str], sigmas: Sequence[float],
          draws: int, seed: int = 0, verbose: bool = True) -> Dict[str, Any]:
  """Accuracy per site, sigma and draw; thresholds of the mean curve."""
  if sigmas[0] != 0.0:
    sigmas = (0.0, *sigmas)  # the clean reference
  base_key = jax.random.PRNGKey(seed)
  t0 = time.perf_counter()
  clean = evaluator.accuracy(noise.Sigmas.make(), base_key)
  out = {"sigmas": list(sigmas), "draws": draws, "seed": seed,
         "clean_acc": clean, "sites": {}}
  for site in sites:
    accs = [[clean] * draws]
    for sigma in sigmas[1:]:
      row = []
      for d in range(draws):
        # draw d of a site: the same key at every sigma and whichever other
        # sites are evaluated
        key = jax.random.fold_in(noise.site_key(base_key, site), d)
        row.append(evaluator.accuracy(noise.Sigmas.make(**{site: sigma}),
                                      key))
      accs.append(row)
      if verbose:
        print(f"  {site:11s} sigma {sigma:<8g} acc {100 * np.mean(row):6.2f}"
              f" ± {100 * np.std(row):.2f}", flush=True)
    means = [float(np.mean(r)) for r in accs]
    out["sites"][site] = {
        "acc": accs, "mean": means, "std": [float(np.std(r)) for r in accs],
        "thresholds": {str(d): threshold(sigmas, means, d) for d in DROPS}}
  out["seconds"] = time.perf_counter() - t0
  return out


def _fmt_threshold(value: Optional[float], sigmas: Sequence[float]) -> str:
  return f"> {max(sigmas):g}" if value is None else f"{value:.3g}"


def markdown(result: Dict[str, Any], title: str, command: str) -> str:
  sigmas = result["sigmas"]
  lines = [f"# Noise robustness: {title}", "",
           f"Test accuracy (%) of the {result.get('which', 'best')} model "
           "(best: selected on validation), mean ± std over "
           f"{result['draws']} noise draws ({result['examples']} test "
           f"examples, noise seed {result['seed']}); clean accuracy "
           f"{100 * result['clean_acc']:.2f}%.  sigma is relative to max|w| "
           "per layer (weights), to each quantizer's alpha (activations) and "
           "to max|y| of each convolution / dense output (MAC).", "",
           f"    {command}", ""]
  header = ["site"] + [f"σ={s:g}" for s in sigmas]
  rows = [[site] + [f"{100 * m:.2f} ± {100 * s:.2f}" for m, s in
                    zip(r["mean"], r["std"])]
          for site, r in result["sites"].items()]
  lines.append(common.markdown_table(header, rows))
  lines += ["", "σ at which the mean accuracy has fallen by 1 / 5 / 20 "
            "points (linear interpolation on the grid):", ""]
  rows = [[site] + [_fmt_threshold(r["thresholds"][str(d)], sigmas)
                    for d in DROPS]
          for site, r in result["sites"].items()]
  lines.append(common.markdown_table(["site", "−1 pt", "−5 pts", "−20 pts"],
                                     rows))
  return "\n".join(lines) + "\n"


def _x(sigmas):
  return np.asarray(sigmas, float)


def _axes_setup(ax, sigmas, title):
  positive = [s for s in sigmas if s > 0]
  if positive:
    ax.set_xscale("symlog", linthresh=min(positive))
  ax.set_xlabel("relative noise σ")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title(title)
  ax.grid(alpha=0.3)


def plot(result: Dict[str, Any], path: pathlib.Path, title: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(6, 4))
  for site, r in result["sites"].items():
    ax.errorbar(_x(result["sigmas"]), 100 * np.asarray(r["mean"]),
                yerr=100 * np.asarray(r["std"]), marker="o", capsize=3,
                label=site)
  _axes_setup(ax, result["sigmas"], title)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def compare(paths: Sequence[str], labels: Optional[Sequence[str]],
            output: pathlib.Path) -> str:
  """Several runs' ``noise.json`` on one plot per site + a threshold table."""
  if labels and len(labels) != len(paths):
    raise ValueError(f"--labels has {len(labels)} entries for "
                     f"{len(paths)} --compare files")
  results = []
  for p in paths:
    path = pathlib.Path(p)
    if not path.is_file():
      raise FileNotFoundError(f"--compare: {path} does not exist (give the "
                              "noise.json files of train.noise runs)")
    results.append(json.loads(path.read_text()))
  labels = list(labels or [r.get("title", p) for r, p in zip(results, paths)])
  sites = [s for s in noise.SITES if any(s in r["sites"] for r in results)]
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, len(sites), figsize=(5 * len(sites), 4),
                           squeeze=False)
  rows = []
  for ax, site in zip(axes[0], sites):
    for label, r in zip(labels, results):
      if site not in r["sites"]:
        continue
      s = r["sites"][site]
      ax.errorbar(_x(r["sigmas"]), 100 * np.asarray(s["mean"]),
                  yerr=100 * np.asarray(s["std"]), marker="o", capsize=3,
                  label=label)
      rows.append([site, label, f"{100 * r['clean_acc']:.2f}"] +
                  [_fmt_threshold(s["thresholds"][str(d)], r["sigmas"])
                   for d in DROPS])
    _axes_setup(ax, results[0]["sigmas"], f"noise at the {site}")
    ax.legend()
  fig.tight_layout()
  output.mkdir(parents=True, exist_ok=True)
  fig.savefig(output / "compare.png", dpi=110)
  plt.close(fig)
  text = common.markdown_table(
      ["site", "run", "clean acc %", "σ at −1 pt", "σ at −5 pts",
       "σ at −20 pts"], rows)
  common.write_text(output / "compare.md", text + "\n")
  return text


def run(workdir: str, sites: Any = noise.SITES, sigmas: Any = "0,0.01,0.1",
        draws: int = 3, max_examples: int = 0, seed: int = 0,
        output: Optional[str] = None, command: str = "",
        verbose: bool = True, which: str = "best") -> Dict[str, Any]:
  """Checks every argument, evaluates, writes noise.json/.md/.png."""
  sites = noise.check_sites(sites, "--sites")
  sigma_list = noise.parse_sigmas(sigmas, "--sigmas")
  validate.integer_at_least(draws, "--draws", 1)
  validate.integer_at_least(max_examples, "--max_examples", 0)
  validate.integer_at_least(seed, "--seed", 0)
  if which not in ("best", "final"):
    raise ValueError(f"--which must be 'best' or 'final', got {which!r}")
  evaluator = load_evaluator(workdir, max_examples, which)
  if "activations" in sites and not evaluator.has_act_quant:
    raise validate.ConfigError(
        "noise site 'activations' is relative to the activation quantizers' "
        f"alpha, and {workdir} has none (a float-activation run)",
        "--sites", ",".join(sites), "allowed here: weights, mac")
  title = evaluator.description + ("" if which == "best" else
                                    " (final model)")
  if verbose:
    print(f"{title}: {evaluator.examples} test examples, sites "
          f"{','.join(sites)}, sigmas {sigma_list}, {draws} draws", flush=True)
  result = sweep(evaluator, sites, sigma_list, draws, seed, verbose)
  result.update({"title": title, "workdir": str(workdir), "which": which,
                 "examples": evaluator.examples, "command": command})
  out_dir = pathlib.Path(output) if output else pathlib.Path(workdir)
  out_dir.mkdir(parents=True, exist_ok=True)
  common.write_json(out_dir / "noise.json", result)
  text = markdown(result, title, command)
  common.write_text(out_dir / "noise.md", text)
  plot(result, out_dir / "noise.png", title)
  if verbose:
    print(text)
  return result


def main(argv):
  common.quiet_absl_logging()
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.compare:
    if not FLAGS.output:
      raise ValueError("--compare needs --output")
    print(compare(FLAGS.compare, FLAGS.labels, pathlib.Path(FLAGS.output)))
    return
  if not FLAGS.workdir:
    raise ValueError("--workdir is required (a finished run)")
  import sys  # pylint: disable=import-outside-toplevel
  command = "python -m train.noise " + " ".join(
      a for a in sys.argv[1:] if not a.startswith("--verbose_errors"))
  run(FLAGS.workdir, FLAGS.sites, FLAGS.sigmas, FLAGS.draws,
      FLAGS.max_examples, FLAGS.seed, FLAGS.output, command,
      which=FLAGS.which)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
