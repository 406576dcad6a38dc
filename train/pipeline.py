"""Multi-stage runs: the two-phase post-training pipeline of Sec. 5.2.

    python -m train.main --config=configs/tv_pipeline.py:resnet20,cifar100,4w4a \
        --workdir=workdirs/table2_4w4a

A pipeline config holds one complete trainer config per stage
(``config.<stage>``), the stages to run in order (``config.stages``) and,
per stage, the stage whose final weights it starts from
(``config.stage_inputs``; arrays the two networks share are copied, new ones
such as the TV γ's keep their initialisation).  Every stage runs in
``<workdir>/<stage>`` with its own checkpoints, so the pipeline resumes where
it stopped; finished stages are read back from their ``results.json``.

Each stage is also an ordinary run of its trainer: the same two phases can be
driven one command at a time with ``--config.init_from=<previous workdir>``.

At the end ``pipeline.md`` / ``pipeline.json`` tabulate every stage (test
accuracy, activation-quantization MSE) and, for stages with TV activations,
the learned γ of every TV layer and the spectral norm of its Jacobian at real
test inputs (with the global bound ``max(1, 8γ²/ε - 1)``).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Dict, List, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections

from pdeq_jax import layers
from pdeq_jax import tv
from train import classify
from train import common
from train import tasks
from train import validate


def check_pipeline_config(config: ml_collections.ConfigDict) -> None:
  """The stages and every stage's config (:func:`validate.pipeline`)."""
  validate.pipeline(config)


def tv_layer_report(stage_config: ml_collections.ConfigDict,
                    workdir: pathlib.Path, source: Any, num_images: int = 8,
                    iters: int = 30) -> List[Dict[str, Any]]:
  """γ and Jacobian spectral norm of every TV activation of a trained stage.

  The inputs of each TV layer are recorded (the ``tv_inputs`` collection
  :class:`pdeq_jax.layers.TVActivation` sows into) on real test images; the
  norm is estimated by power iteration (:func:`pdeq_jax.tv.tv_jacobian_norm`).
  """
  model = classify.create_model(stage_config, source.num_classes)
  variables = classify.load_source_variables(str(workdir), "best")
  x = jnp.asarray(next(iter(source.eval_batches("test", num_images)))[0])
  bits = classify.target_bits(stage_config)

  @jax.jit
  def record(variables, x, bits):
    _, recorded = model.apply(variables, x, bits, mutable=["tv_inputs"])
    return recorded["tv_inputs"]

  recorded = flax.traverse_util.flatten_dict(
      flax.core.unfreeze(record(variables, x, bits)))
  layer_paths = sorted({path[:-1] for path in recorded})
  rows = []
  for path in layer_paths:
    (tv_input,), (gamma,) = recorded[path + ("input",)], recorded[
        path + ("gamma",)]
    eps = layers.TVActivation.eps
    norm = float(tv.tv_jacobian_norm(tv_input, gamma, eps=eps, iters=iters))
    rows.append({"layer": "/".join(path), "gamma": float(gamma),
                 "jacobian_norm": norm,
                 "jacobian_bound": float(tv.tv_jacobian_bound(gamma, eps))})
  return rows


def sign_form_accuracy(stage_config: ml_collections.ConfigDict,
                       workdir: pathlib.Path, source: Any) -> Dict[str, float]:
  """Test metrics of a TV stage's model with the sign-only inference form
  of its TV activations (``sign(G x)``: additions and signs only)."""
  config = ml_collections.ConfigDict(stage_config.to_dict())
  config.model.tv_sign_form = True
  task = tasks.trainer_for(config.task).TASK
  model = classify.create_model(config, source.num_classes)
  variables = classify.load_source_variables(str(workdir), "best")
  mesh = classify.make_mesh()
  eval_step = classify.jit_eval_step(classify.make_eval_step(model, task),
                                     mesh)
  metrics = classify.evaluate(
      eval_step, variables,
      source.eval_batches("test", int(config.eval_batch_size)),
      bits=classify.target_bits(config), mesh=mesh, task=task)
  return {f"test_{k}_sign_form": v for k, v in metrics.items()
          if k != "count"}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       verbose: bool = True, *,
                       max_steps_this_call: Optional[int] = None,
                       dataset: Optional[Any] = None
                       ) -> Dict[str, Any]:
  """Runs the stages in order (resuming), then writes the pipeline report.

  ``max_steps_this_call`` bounds the training steps of this call (over all
  stages) to simulate a crash in tests; ``dataset`` replaces every stage's
  ``config.data`` (tests).
  """
  validate.pipeline(config)
  workdir = common.prepare_workdir(workdir, config)
  summary: Dict[str, Any] = {"stages": {}}
  for stage in config.stages:
    stage_config = ml_collections.ConfigDict(config[stage].to_dict())
    source = config.stage_inputs.get(stage, "")
    if source:
      stage_config.init_from = str(workdir / source)
      stage_config.init_from_model = "final"
    elif config.pretrained:
      stage_config.init_from = config.pretrained
    stage_dir = workdir / stage
    results_file = stage_dir / "results.json"
    if results_file.exists():
      results = json.loads(results_file.read_text())
      if verbose:
        print(f"[{stage}] finished earlier: test "
              f"{100 * results['test_acc']:.2f}%")
    else:
      if verbose:
        print(f"[{stage}] {stage_config.model.name} "
              f"{stage_config.quant.weight_bits}W{stage_config.quant.act_bits}A"
              f", {stage_config.num_epochs} epochs, from "
              f"{stage_config.init_from or 'scratch'}", flush=True)
      trainer = tasks.trainer_for(stage_config.task)
      results = trainer.train_and_evaluate(
          stage_config, str(stage_dir), verbose=verbose,
          max_steps_this_call=max_steps_this_call, dataset=dataset)
      if "interrupted_at_step" in results:
        return {"interrupted_stage": stage, **results}
      if max_steps_this_call is not None:
        max_steps_this_call -= results["steps_this_call"]
    if stage_config.model.get("tv_activation", False):
      source = tasks.trainer_for(stage_config.task).make_source(stage_config,
                                                                dataset)
      results["tv_layers"] = tv_layer_report(stage_config, stage_dir, source)
      results.update(sign_form_accuracy(stage_config, stage_dir, source))
    summary["stages"][stage] = results
  common.write_json(workdir / "pipeline.json", summary)
  text = pipeline_markdown(config, summary)
  common.write_text(workdir / "pipeline.md", text)
  if verbose:
    print(text)
  return summary


def pipeline_markdown(config: ml_collections.ConfigDict,
                      summary: Dict[str, Any]) -> str:
  rows = []
  for stage, r in summary["stages"].items():
    mse = r.get("act_mse")
    nmse = r.get("act_normalized_mse")
    tv_rows = r.get("tv_layers", [])
    rows.append([
        stage, r["model"], f"{r['weight_bits']}W{r['act_bits']}A",
        "TV" if tv_rows else "", r["epochs"],
        f"{100 * r['test_acc']:.2f}", f"{100 * r['test_acc_final']:.2f}",
        f"{100 * r['test_acc_sign_form']:.2f}" if "test_acc_sign_form" in r
        else "–",
        f"{100 * r['test_miou']:.2f}" if "test_miou" in r else "–",
        "–" if mse is None else f"{mse:.4g}",
        "–" if nmse is None else f"{nmse:.4g}"])
  text = ("# Pipeline\n\nTest accuracy of the best-validation model (and of "
          "the final one); activation MSE between the b-bit and the clip-only"
          " activations of the same weights (mean over layers; normalised: "
          "per layer by the clip-only mean square).\n\n")
  text += common.markdown_table(
      ["stage", "model", "bits", "TV", "epochs", "test acc %",
       "final test acc %", "test acc %, sign-form TV", "test mIoU %",
       "act MSE", "normalised act MSE"],
      rows)
  for stage, r in summary["stages"].items():
    if not r.get("tv_layers"):
      continue
    text += (f"\n## TV layers of stage `{stage}`\n\nγ learned per layer; "
             "‖∂S/∂x‖₂ by power iteration at real test inputs (1.0 = "
             "non-expansive: maps constant per channel are fixed points, so "
             "the norm is never below 1); bound = max(1, 8γ²/ε − 1).\n\n")
    text += common.markdown_table(
        ["layer", "γ", "Jacobian norm", "bound"],
        [[t["layer"], f"{t['gamma']:.4f}", f"{t['jacobian_norm']:.4f}",
          f"{t['jacobian_bound']:.3g}"] for t in r["tv_layers"]])
  return text
