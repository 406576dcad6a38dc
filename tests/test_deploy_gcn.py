"""Integer PDE-GCN (pdeq_jax.deploy.gcn) against an independent numpy int64
reference, and against the fake-quant model it was converted from."""

import jax
import numpy as np
import pytest

from pdeq_jax import layers
from pdeq_jax import models
from pdeq_jax.deploy import convert as convert_lib
from pdeq_jax.deploy import gcn
from pdeq_jax.models import pde_gcn
from tests.test_pde_gcn import _random_graph as random_graph

BITS = layers.QuantBits.make(4, 4)


def _random_graph(seed=0):
  return random_graph(num_nodes=40, num_edges=90, seed=seed)


def _trained_like(symmetric, fold, seed=0):
  """A 4-layer PDE-GCN with quantized weights; kernels away from identity."""
  graph = pde_gcn.GraphOperator.from_graph(_random_graph(seed=seed),
                                           fold_edge_directions=fold)
  model = models.create("pde_gcn", num_classes=3, width=8, depth=4, h=0.3,
                        dropout_in=0.0, dropout_out=0.0, dropout_edges=0.0,
                        symmetric=symmetric, quantize_weights=True,
                        alpha_init_mode="max", alpha_init=1.0)
  key = jax.random.PRNGKey(seed)
  features = jax.random.uniform(key, (40, 12))
  variables = model.init(key, features, graph, BITS)
  params = dict(variables["params"])
  for name in ("kernel", "kernel_out"):
    if name in params:
      params[name] = params[name] + 0.4 * jax.random.normal(
          jax.random.PRNGKey(seed + 7), params[name].shape)
  return model, {"params": params}, graph, features


def _round_half_even_div(v, shift):
  v = np.asarray(v, np.int64)
  if shift == 0:
    return v
  q, r = np.divmod(v, np.int64(2) ** shift)
  up = (2 * r > 2 ** shift) | ((2 * r == 2 ** shift) & (q % 2 == 1))
  return q + up


def reference(program, q):
  """Own loops (edges, thresholds) and einsum; int64 throughout."""
  g = program["graph"]
  n = g["num_nodes"]
  levels = program["input"]["levels"]
  w = np.asarray(g["weights"], np.int64)
  q = np.asarray(q, np.int64)
  env = {}
  for j, op in enumerate(program["layers"]):
    k = np.asarray(program["weights"][op["K"]], np.int64)
    a = np.einsum("nc,co->no", q, k)
    assert np.abs(a).max() <= 2 ** 31 - 1
    e = np.zeros((len(w), k.shape[1]), np.int64)
    for idx, (s, r) in enumerate(zip(g["senders"], g["receivers"])):
      p = (a[s] - a[r]) * w[idx]
      up = sum((p >= t).astype(np.int64) for t in op["thresholds"])
      if g["fold"]:
        down = sum((-p >= t).astype(np.int64) for t in op["thresholds"])
        e[idx] = 2 * (up - down)
      else:
        e[idx] = 2 * up - levels
    y = np.zeros((n, k.shape[1]), np.int64)
    for idx, (s, r) in enumerate(zip(g["senders"], g["receivers"])):
      y[s] += w[idx] * e[idx]
      y[r] -= w[idx] * e[idx]
    kz = np.asarray(program["weights"][op["Z"]], np.int64)
    z = np.einsum("no,co->nc", y, kz) if op["transpose"] else np.einsum(
        "no,oc->nc", y, kz)
    assert np.abs(z).max() <= op["z_bound"]
    v = (q * op["m_x"][0] + _round_half_even_div(z, op["pre_shift"]) *
         op["m_z"][0] + op["bias"][0])
    env.update({f"layer{j}/a": a, f"layer{j}/e": e, f"layer{j}/y": y,
                f"layer{j}/z": z})
    if "head_weight" in op:
      f = _round_half_even_div(v, op["post_shift"])
      env["features"] = f
      weight = np.asarray(op["head_weight"], np.float32)
      ff = f.astype(np.float32)
      acc = ff[:, 0:1] * weight[0]
      for c in range(1, weight.shape[0]):
        acc = acc + ff[:, c:c + 1] * weight[c]
      env["logits"] = acc + np.float32(0)
    else:
      kk = np.clip(_round_half_even_div(v, op["shift"]), 0, op["levels"])
      q = 2 * kk - op["levels"]
      env[f"layer{j + 1}/q"] = q
  return env


@pytest.mark.parametrize("symmetric,fold", [(True, True), (False, False)])
def test_gcn_bit_exact_and_agrees_with_fake_quant(symmetric, fold):
  model, variables, graph, features = _trained_like(symmetric, fold)
  program = gcn.convert(model, variables, graph, (4, 4))
  q0 = gcn.input_codes(program, features)
  logits, env = gcn.run(program, q0, return_intermediates=True)
  ref = reference(program, q0)
  for name, value in ref.items():
    got = logits if name == "logits" else env[name]
    np.testing.assert_array_equal(np.asarray(got), value, err_msg=name)
  # the tanh codes are not all saturated or all zero: thresholds do work
  e = np.asarray(env["layer0/e"])
  assert len(np.unique(e)) > 3
  # every state stays on the odd mid-rise codes
  for j in range(1, 4):
    qj = np.asarray(env[f"layer{j}/q"])
    assert np.all(qj % 2 == 1) and np.abs(qj).max() <= 15
  # against the fake-quant model: the same node states and predictions
  fake, hidden = model.apply(variables, features, graph, BITS,
                             return_hidden=True)
  alphas = np.maximum(np.asarray(variables["params"]["alpha_state"]), 1e-4)
  for j in range(1, 4):  # hidden[j]: layer j's quantized input state
    want = np.round(np.asarray(hidden[j]) * 15 / alphas[j])
    assert np.mean(want == np.asarray(env[f"layer{j}/q"])) >= 0.99
  np.testing.assert_array_equal(np.argmax(np.asarray(logits), -1),
                                np.argmax(np.asarray(fake), -1))


def test_gcn_onnxruntime_equals_jax():
  from pdeq_jax.deploy import onnx_export
  model, variables, graph, features = _trained_like(True, True, seed=1)
  program = gcn.convert(model, variables, graph, (4, 4))
  q0 = np.asarray(gcn.input_codes(program, features))
  onnx_model = onnx_export.export_gcn(program)
  import onnx
  onnx.checker.check_model(onnx_model)
  got = onnx_export.session(onnx_model, intra_op_threads=1).run(
      None, {"q": q0})[0]
  want = np.asarray(gcn.run(program, q0))
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, want)


def test_gcn_errors():
  model, variables, graph, _ = _trained_like(True, True)
  float_weights = models.create("pde_gcn", num_classes=3, width=8, depth=4)
  with pytest.raises(convert_lib.UnsupportedModelError,
                     match="quantize_weights=False"):
    gcn.convert(float_weights, variables, graph, (4, 4))
  with pytest.raises(convert_lib.UnsupportedModelError, match="2..8 bits"):
    gcn.convert(model, variables, graph, (None, 4))


def _tiny_cora_run(data_dir, workdir, weight_bits):
  """A 4-layer width-16 PDE-GCN trained 2 epochs on real Cora."""
  from configs import pde_gcn as gcn_configs
  from train import node_classify
  config = gcn_configs.get_config("cora,sym,4w4a")
  config.data.data_dir = str(data_dir / "planetoid")
  config.model.depth, config.model.width = 4, 16
  config.num_epochs = 2
  config.checkpoint_every = 2
  config.quant.weight_bits = weight_bits
  node_classify.train_and_evaluate(config, str(workdir), verbose=False)
  return str(workdir)


def test_export_cli_gcn_run(data_dir, tmp_path):
  """train.export on a finished PDE-GCN run: ONNX logits equal the JAX
  integer path on every node, and the files load again."""
  import json
  from pdeq_jax.deploy import onnx_export
  from pdeq_jax.deploy import pack
  from pdeq_jax.deploy import stablehlo
  from train import export
  run = _tiny_cora_run(data_dir, tmp_path / "run", 4)
  out = tmp_path / "onnx"
  s = export.export(run, "onnx", str(out))
  assert s["count"] == 1000 and s["nodes"] == 2708
  assert s["export_logit_mismatch_all_nodes"] == 0
  assert s["export_disagree"] == 0 and s["correct_export"] == s["correct_int"]
  assert s["correct_fake"] > 300  # 2 epochs on Cora: well above 1/7 chance
  assert json.loads((out / "summary.json").read_text())["bits"] == {
      "weights": 4, "activations": 4}
  text = (out / "deploy.md").read_text()
  assert "What stays float" in text and "| 3 | 4 |" in text
  # independent of train.export: the compact checkpoint runs in gcn.run, the
  # saved ONNX in onnxruntime, the StableHLO artifact alone, all equal
  config, variables, bits, _ = export.load_run(run)
  from train import node_classify
  task = node_classify.load_task(config)
  model = node_classify.create_model(config, task.num_classes)
  program = pack.load(out / "model.pdeq")
  q0 = np.asarray(gcn.input_codes(program, task.features.todense()))
  want = np.asarray(gcn.run(gcn.convert(model, variables, task.graph, bits),
                            q0))
  np.testing.assert_array_equal(np.asarray(gcn.run(program, q0)), want)
  got = onnx_export.session(str(out / "model.onnx"), intra_op_threads=1).run(
      None, {"q": q0})[0]
  np.testing.assert_array_equal(got, want)
  s = export.export(run, "stablehlo", str(tmp_path / "hlo"))
  assert s["export_logit_mismatch_all_nodes"] == 0
  loaded = stablehlo.load(tmp_path / "hlo" / "model.stablehlo")
  np.testing.assert_array_equal(np.asarray(loaded(q0)), want)


def test_export_cli_gcn_float_weights_error(tmp_path):
  """A Table 7 config (float K) run: one line telling how to train it."""
  import subprocess
  import sys
  from configs import pde_gcn as gcn_configs
  from tests.conftest import REPO_ROOT
  from train import export
  run = tmp_path / "run"
  (run / "checkpoints" / "1").mkdir(parents=True)
  (run / "config.json").write_text(
      gcn_configs.get_config("cora,sym,4w4a").to_json())
  (run / "results.json").write_text("{}")
  with pytest.raises(export.ExportError,
                     match=r"float weights \(config.quant.weight_bits=32.*"
                     r"--config.quant.weight_bits=4 \(or 2..8\)"):
    export.load_run(str(run))
  proc = subprocess.run(
      [sys.executable, "-m", "train.export", f"--workdir={run}",
       f"--output={tmp_path / 'out'}"], cwd=REPO_ROOT, capture_output=True,
      text=True, check=False)
  assert proc.returncode != 0
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "--config.quant.weight_bits=4" in lines[0], (
      proc.stderr)
