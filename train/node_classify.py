"""Full-batch node classification trainer (PDE-GCN on Planetoid graphs).

    python -m train.main --config=configs/pde_gcn.py:cora,sym,4w4a --workdir=DIR

Model selection is by validation accuracy (ties: lower validation loss) among
the epochs trained at the target bits (with ``quant.gradual`` the earlier,
higher-precision epochs are not candidates, and the patience count starts at
the first target-bits epoch); the reported test accuracy is the one at the
selected epoch.  (The paper's sweeps
kept the best *test* accuracy over epochs; that is optimistic and not done
here.)  Checkpoints hold everything the loop needs, so a killed run resumed in
the same workdir ends with exactly the result of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pathlib
import time
from typing import Any, Callable, Dict, Optional, Tuple

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from pdeq_jax import consistency
from pdeq_jax import layers
from pdeq_jax import models
from pdeq_jax import noise
from pdeq_jax import quant
from pdeq_jax import xla_options
from pdeq_jax.data import planetoid
from pdeq_jax.models import pde_gcn
from pdeq_jax.models.pde_gcn import GraphOperator
from pdeq_jax.models.pde_gcn import SparseFeatures
from train import common
from train import noise as train_noise
from train import validate

FLOAT_BITS = common.FLOAT_BITS


@flax.struct.dataclass
class NodeTask:
  """Device-resident data of one graph (passed to jitted steps as arguments:
  as closure constants XLA would constant-fold gathers over them)."""
  features: Any  # jax.Array or SparseFeatures
  labels: jax.Array
  graph: GraphOperator
  train_idx: jax.Array
  val_idx: jax.Array
  test_idx: jax.Array
  num_classes: int = flax.struct.field(pytree_node=False)


# The development layout keeps the offline datasets beside the repository.
_SIBLING_DATA_DIR = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


def resolve_data_dir(configured: str) -> Optional[str]:
  """config value, else $PDEQ_DATA_DIR, else ../shared/data if present, else
  None (the loader's download cache)."""
  if configured:
    return configured
  if os.environ.get(planetoid.ENV_VAR):
    return os.environ[planetoid.ENV_VAR]
  if _SIBLING_DATA_DIR.is_dir():
    return str(_SIBLING_DATA_DIR)
  return None


def load_task(config: ml_collections.ConfigDict) -> NodeTask:
  data = planetoid.load_planetoid(
      config.data.name, resolve_data_dir(config.data.get("data_dir", "")))
  graph = GraphOperator.from_graph(
      data.graph, fold_edge_directions=config.model.fold_edge_directions)
  idx = lambda m: jnp.asarray(np.flatnonzero(np.asarray(m)), jnp.int32)
  features = (SparseFeatures.from_dense(data.features)
              if config.data.sparse_features else jnp.asarray(data.features))
  return NodeTask(features, jnp.asarray(data.labels),
                  graph, idx(data.train_mask), idx(data.val_mask),
                  idx(data.test_mask), int(data.num_classes))


def create_model(config: ml_collections.ConfigDict, num_classes: int):
  options = {k: v for k, v in config.model.to_dict().items() if k != "name"}
  return models.create(
      config.model.name, num_classes,
      quantize_activations=config.quant.act_bits != FLOAT_BITS,
      quantize_weights=config.quant.weight_bits != FLOAT_BITS,
      lsq_grad_scale=config.quant.lsq_grad_scale, **options)


def param_group(path: Tuple[str, ...]) -> str:
  """The three optimiser groups of the authors' code."""
  name = path[-1]
  if name.startswith("alpha"):
    return "alpha"
  if name.startswith("kernel") and path[0] not in ("open", "close"):
    return "kernel"
  return "dense"


def create_optimizer(config: ml_collections.ConfigDict, params) -> optax.GradientTransformation:
  """Adam with L2 (coupled, as torch.optim.Adam) per parameter group."""
  o = config.optim
  adam_l2 = lambda lr, wd: optax.chain(optax.add_decayed_weights(wd),
                                       optax.adam(lr))
  labels = flax.traverse_util.path_aware_map(lambda p, _: param_group(p), params)
  return optax.multi_transform(
      {"dense": adam_l2(o.lr, o.weight_decay),
       "kernel": adam_l2(o.lr_kernel, o.weight_decay_kernel),
       "alpha": adam_l2(o.lr_alpha, 0.0)}, labels)


bits_for_epoch = common.bits_for_epoch


def init_params(config, model, task: NodeTask):
  init_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0)
  return model.init(init_key, task.features, task.graph,
                    layers.QuantBits.make(None, None))["params"]


def initial_state(config, params, tx) -> Dict[str, Any]:
  dropout_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1)
  return {
      "params": params,
      "opt_state": tx.init(params),
      "epoch": jnp.int32(0),
      "dropout_key": dropout_key,
      "best": {"val_acc": jnp.float32(-1.0), "val_loss": jnp.float32(jnp.inf),
               "test_acc": jnp.float32(0.0), "train_acc": jnp.float32(0.0),
               "epoch": jnp.int32(-1), "params": params},
  }


def _nll(logits, labels, idx):
  return -jnp.mean(jnp.take_along_axis(logits[idx], labels[idx][:, None], 1))


def _accuracy(logits, labels, idx):
  return jnp.mean(jnp.argmax(logits[idx], -1) == labels[idx])


def make_train_step(model, tx, task: NodeTask, training_noise=None):
  """``train_step(params, opt_state, bits, rng)``; the data are jit arguments.

  With ``training_noise`` (``(sites, fn)`` from
  ``train.noise.training_noise``): ``train_step(params, opt_state, bits,
  rng, epoch)``, the noise's sigma and key being ``fn(epoch)`` (runtime
  values: one compilation for every epoch).
  """
  sites = None if training_noise is None else training_noise[0]

  def loss_fn(params, task, bits, rng, noise_args):
    context = (contextlib.nullcontext() if noise_args is None
               else noise.inject(*noise_args, sites))
    with context:
      logits = model.apply({"params": params}, task.features, task.graph,
                           bits, train=True, rngs={"dropout": rng})
    return _nll(logits, task.labels, task.train_idx)

  @functools.partial(xla_options.jit, workload="graph")
  def train_step(params, opt_state, bits, rng, noise_args, task):
    loss, grads = jax.value_and_grad(loss_fn)(params, task, bits, rng,
                                              noise_args)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  if training_noise is None:
    return functools.partial(train_step, noise_args=None, task=task)

  def noisy_step(params, opt_state, bits, rng, epoch):
    return train_step(params, opt_state, bits, rng,
                      training_noise[1](jnp.int32(epoch)), task=task)
  return noisy_step


def make_eval_step(model, task: NodeTask):
  @functools.partial(xla_options.jit, workload="graph")
  def eval_step(params, bits, task):
    logits = model.apply({"params": params}, task.features, task.graph, bits)
    return {
        "train_acc": _accuracy(logits, task.labels, task.train_idx),
        "val_acc": _accuracy(logits, task.labels, task.val_idx),
        "test_acc": _accuracy(logits, task.labels, task.test_idx),
        "val_loss": _nll(logits, task.labels, task.val_idx),
    }
  return functools.partial(eval_step, task=task)


def evaluate_consistency(model, params, task: NodeTask, bits: layers.QuantBits
                         ) -> Dict[str, Any]:
  """Accuracy at b bits and clip-only, and the per-layer hidden-state MSE.

  The clip-only reference rounds only the activations away: the weights stay
  at their ``bits.weights`` in both runs (as in the image trainer).
  """
  @functools.partial(xla_options.jit, workload="graph")
  def run(params, b, task):
    logits, hidden = model.apply({"params": params}, task.features, task.graph,
                                 b, return_hidden=True)
    return _accuracy(logits, task.labels, task.test_idx), hidden
  common.check_runtime_bits(bits)
  clip_only = layers.QuantBits(bits.weights, quant.bits_as_array(None))
  acc_b, hidden_b = run(params, bits, task)
  acc_ref, hidden_ref = run(params, clip_only, task)
  stats = consistency.activation_mse(hidden_b, hidden_ref)
  # the compared states are the outputs of each layer's state quantizer
  step = quant.grid_step(layers.positive_alpha(params["alpha_state"]),
                         bits.activations, signed=True, grid=model.grid)
  ratio = consistency.rounding_noise_ratio(stats["mse"], step)
  return {"test_acc_bits": float(acc_b), "test_acc_clip_only": float(acc_ref),
          **stats, "mse_over_rounding_noise": ratio,
          "overall_mse_over_rounding_noise": float(ratio.mean())}


def _to_host(tree):
  return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       *, max_epochs_this_call: Optional[int] = None,
                       verbose: bool = True,
                       epoch_callback: Optional[
                           Callable[[int, Dict[str, float]], bool]] = None
                       ) -> Dict[str, Any]:
  """Trains, selects on validation, evaluates; returns the results dict.

  ``max_epochs_this_call`` stops early (after checkpointing) to simulate a
  crash in tests.  ``epoch_callback(epoch, metrics)``, called after every
  epoch with that epoch's metrics and ``best_val_acc`` (the best so far),
  abandons the run when it returns True (a sweep's pruner): the result is
  then ``{"stopped_by_callback_at_epoch": epoch}``.
  """
  validate.gcn(config)
  train_noise.check_train_config(config)
  workdir = common.prepare_workdir(workdir, config)
  task = load_task(config)
  model = create_model(config, task.num_classes)
  params = init_params(config, model, task)
  tx = create_optimizer(config, params)
  state = initial_state(config, params, tx)
  ckpt = common.Checkpointer(workdir / "checkpoints")
  writer = common.MetricWriter(workdir)
  if ckpt.latest_step() is not None:
    state = ckpt.restore(state)
    logging.info("resumed from epoch %d", int(state["epoch"]))
    if verbose:
      print(f"resumed from {workdir} at epoch {int(state['epoch'])}")
  start_epoch = int(state["epoch"])
  writer.truncate_after(start_epoch - 1, key="epoch")
  last_good = f"step {start_epoch}" if start_epoch else None

  training_noise = train_noise.training_noise(config, 1)
  train_step = (make_train_step(model, tx, task) if training_noise is None
                else make_train_step(model, tx, task, training_noise))
  noise_epoch = (lambda e: {}) if training_noise is None else (
      lambda e: {"epoch": e})
  eval_step = make_eval_step(model, task)
  num_epochs = int(config.num_epochs)
  patience = int(config.patience)
  progress = common.Progress(num_epochs, start=start_epoch, unit="epoch",
                             enabled=verbose)
  params, opt_state = state["params"], state["opt_state"]
  best = _to_host(state["best"])
  stop_epoch = num_epochs if max_epochs_this_call is None else min(
      num_epochs, start_epoch + max_epochs_this_call)
  t_start = time.perf_counter()
  epoch = start_epoch
  stopped_early = False
  while epoch < stop_epoch:
    if patience and best["epoch"] >= 0 and epoch - best["epoch"] > patience:
      stopped_early = True
      break
    bits = bits_for_epoch(config, epoch)
    common.check_runtime_bits(bits)
    rng = jax.random.fold_in(state["dropout_key"], epoch)
    params, opt_state, loss = train_step(params, opt_state, bits, rng,
                                         **noise_epoch(epoch))
    metrics = _to_host(eval_step(params, bits))
    # epochs are logged 0-based, checkpoints by steps (= epochs) done:
    # "epoch e (step e + 1)" is the (e + 1)-th full-batch step
    common.check_finite({"loss": loss, **metrics},
                        f"epoch {epoch} (step {epoch + 1})", last_good,
                        on_error=ckpt.close)
    improved = common.at_target_bits(config, bits) and (
        metrics["val_acc"] > best["val_acc"] or
        (metrics["val_acc"] == best["val_acc"] and
         metrics["val_loss"] < best["val_loss"]))
    if improved:
      best = {**{k: metrics[k] for k in ("val_acc", "val_loss", "test_acc",
                                         "train_acc")},
              "epoch": np.int32(epoch), "params": _to_host(params)}
    host_metrics = {k: float(v) for k, v in metrics.items()}
    writer.write(epoch=epoch, loss=float(loss), act_bits=int(bits.activations),
                 weight_bits=int(bits.weights), **host_metrics,
                 **common.quantizer_stats(params))
    if epoch_callback is not None and epoch_callback(
        epoch, {**host_metrics, "best_val_acc": float(best["val_acc"])}):
      ckpt.close()
      writer.close()
      return {"stopped_by_callback_at_epoch": epoch}
    epoch += 1
    progress.update(epoch, extra=f"loss {float(loss):.3f} val "
                    f"{metrics['val_acc']:.3f} best val {best['val_acc']:.3f}"
                    f" (test {best['test_acc']:.3f} @ {int(best['epoch'])})")
    if epoch % int(config.checkpoint_every) == 0 or epoch == stop_epoch:
      common.check_finite({"parameters": params},
                          f"epoch {epoch - 1} (step {epoch})", last_good,
                          on_error=ckpt.close)
      last_good = f"step {epoch}"
      ckpt.save(epoch, {"params": params, "opt_state": opt_state,
                        "epoch": jnp.int32(epoch),
                        "dropout_key": state["dropout_key"], "best": best})
  ckpt.close()
  writer.close()
  train_seconds = time.perf_counter() - t_start
  if max_epochs_this_call is not None and epoch < num_epochs \
      and not stopped_early:
    return {"interrupted_at_epoch": epoch}

  results = {
      "dataset": config.data.name, "model": config.model.name,
      "symmetric": bool(config.model.symmetric),
      "weight_bits": int(config.quant.weight_bits),
      "act_bits": int(config.quant.act_bits),
      "seed": int(config.seed),
      "best_epoch": int(best["epoch"]), "epochs_run": epoch,
      "stopped_early": stopped_early,
      "val_acc": float(best["val_acc"]), "test_acc": float(best["test_acc"]),
      "train_acc": float(best["train_acc"]),
      "num_params": int(sum(np.size(p) for p in
                            jax.tree_util.tree_leaves(best["params"]))),
      "train_seconds_this_call": train_seconds,
      "epochs_per_second": (epoch - start_epoch) / max(train_seconds, 1e-9),
  }
  if config.quant.act_bits != FLOAT_BITS:
    _add_consistency(results, config, model, best["params"], task, workdir)
  common.write_json(workdir / "results.json", results)
  plot_curves(writer.read(), workdir / "curves.png")
  if verbose:
    print(summary_line(results))
  return results


def _add_consistency(results, config, model, params, task: NodeTask,
                     workdir: pathlib.Path) -> None:
  """Consistency of the selected params at the final bits, into ``results``."""
  final_bits = bits_for_epoch(config, max(int(config.num_epochs) - 1, 0))
  params = jax.tree_util.tree_map(jnp.asarray, params)
  stats = evaluate_consistency(model, params, task, final_bits)
  stats.update({f"kernel_{k}": v for k, v in
                pde_gcn.kernel_statistics(params).items()})
  results["consistency"] = stats
  results["act_mse"] = stats["overall_mse"]
  consistency.plot_layerwise_mse(
      {("symmetric" if config.model.symmetric else "non-symmetric"):
       stats["normalized_mse"]}, str(workdir / "layerwise_mse.png"),
      title=f"{config.data.name}: {config.quant.act_bits}-bit vs clip-only")


def recompute_consistency(config: ml_collections.ConfigDict, workdir: str
                          ) -> Dict[str, Any]:
  """Re-evaluates the consistency of a finished run from its checkpoint.

  The selected (best-validation) parameters are restored from the run's last
  checkpoint, so statistics added after the run was trained can be computed
  without training again; ``results.json`` is updated and returned.
  """
  workdir = common.prepare_workdir(workdir, config)
  results_file = workdir / "results.json"
  if not results_file.exists():
    raise FileNotFoundError(f"{results_file} does not exist: the run at "
                            f"{workdir} has not finished")
  results = json.loads(results_file.read_text())
  if config.quant.act_bits == FLOAT_BITS:
    return results
  task = load_task(config)
  model = create_model(config, task.num_classes)
  params = init_params(config, model, task)
  tx = create_optimizer(config, params)
  ckpt = common.Checkpointer(workdir / "checkpoints")
  state = ckpt.restore(initial_state(config, params, tx))
  ckpt.close()
  if int(state["best"]["epoch"]) != int(results["best_epoch"]):
    raise ValueError(f"{workdir}: the checkpoint's selected epoch "
                     f"{int(state['best']['epoch'])} is not results.json's "
                     f"{results['best_epoch']}")
  _add_consistency(results, config, model, state["best"]["params"], task,
                   workdir)
  common.write_json(results_file, results)
  return results


def summary_line(r: Dict[str, Any]) -> str:
  mse = f" act MSE {r['act_mse']:.4g}" if "act_mse" in r else ""
  return (f"{r['dataset']} {'sym' if r['symmetric'] else 'non-sym'} "
          f"{r['weight_bits']}W{r['act_bits']}A seed {r['seed']}: test "
          f"{100 * r['test_acc']:.2f}% at best val {100 * r['val_acc']:.2f}% "
          f"(epoch {r['best_epoch']}){mse}, {r['epochs_per_second']:.2f} "
          f"epochs/s")


def plot_curves(rows, path) -> None:
  if not rows:
    return
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  epochs = [r["epoch"] for r in rows]
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
  ax1.plot(epochs, [r["loss"] for r in rows], label="train loss")
  ax1.plot(epochs, [r["val_loss"] for r in rows], label="val loss")
  ax1.set_xlabel("epoch"); ax1.legend(); ax1.grid(alpha=0.3)
  for key in ("train_acc", "val_acc", "test_acc"):
    ax2.plot(epochs, [r[key] for r in rows], label=key)
  ax2.set_xlabel("epoch"); ax2.set_ylim(0, 1); ax2.legend(); ax2.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
