"""Fixed-point post-training quantization (pdeq_jax.ptq, train.ptq)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdeq_jax import models
from pdeq_jax import ptq
from pdeq_jax.data import images as image_data
from tests.test_classify import tiny_config
from tests.test_classify import tiny_dataset
from train import classify
from train import ptq as ptq_cli


# -------------------------------------------------- hand-computed values ---

def test_fixed_point_hand_values():
  x = jnp.array([0.3, -0.7, 1.26, 5.0, -5.0])
  # BW 4, F 2: x·4 = 1.2, -2.8, 5.04, 20, -20 -> 1, -3, 5, clip 7, clip -7
  np.testing.assert_array_equal(
      ptq.fixed_point(x, 4, 2), [0.25, -0.75, 1.25, 1.75, -1.75])
  # F < 0: steps of 2, BW 3 -> codes in [-3, 3]
  np.testing.assert_array_equal(ptq.fixed_point(jnp.array([3.1, 9.0]), 3, -1),
                                [4.0, 6.0])
  # bw = 0: left in float
  np.testing.assert_array_equal(ptq.fixed_point(x, 0, 5), x)
  np.testing.assert_array_equal(ptq.codes(x, 4, 2), [1, -3, 5, 7, -7])


def test_round_half_even_at_ties():
  ties = jnp.array([0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5])
  np.testing.assert_array_equal(ptq.fixed_point(ties, 8, 0),
                                [0, 2, 2, 4, 0, -2, -2])
  # F = 2: x·4 lands on .5 exactly
  np.testing.assert_array_equal(
      ptq.fixed_point(jnp.array([0.125, 0.375, -0.625]), 8, 2),
      [0.0, 0.5, -0.5])
  # the integer shift rounds the same way
  np.testing.assert_array_equal(
      ptq.round_half_even_shift(np.array([2, 6, 10, -2, -6, 3, -3, 5]), 2),
      [0, 2, 2, 0, -2, 1, -1, 1])


def test_init_frac_and_tensor_format():
  assert ptq.init_frac(1.0, 8) == 7        # ceil(log2 1) = 0
  assert ptq.init_frac(0.3, 8) == 8        # ceil(-1.74) = -1
  assert ptq.init_frac(5.0, 8) == 4        # ceil(2.32) = 3
  assert ptq.init_frac(4.0, 8) == 5        # exact power of two: 2
  assert ptq.init_frac(0.0, 6) == 5
  assert ptq.tensor_format(np.array([-3.0, 1.0]), 6) == (6, 3)
  # the format covers the peak up to one step
  x = jnp.array([-3.0, 1.0])
  assert float(jnp.max(jnp.abs(ptq.fixed_point(x, 6, 3) - x))) <= 2.0 ** -3


def test_cost_model_hand_values():
  sites = [ptq.Site("w1", "weight", 10), ptq.Site("a1", "act", 5),
           ptq.Site("w2", "weight", 20), ptq.Site("a2", "act", 7)]
  products = [ptq.Product("w1", "a1", 100), ptq.Product("w2", "a2", 50)]
  bw = [4, 8, 2, 0]   # a2 float: counted as 32 bits
  assert ptq.memory_kib(sites, bw) == (4 * 10 + 2 * 20) / 8 / 1024
  assert ptq.activation_kib(sites, bw) == (8 * 5 + 32 * 7) / 8 / 1024
  assert ptq.mult_cost(sites, products, bw) == 4 * 8 * 100 + 2 * 32 * 50


def test_integer_layer_is_bit_exact():
  """Codes in, int64 accumulation, a rounding shift out == the fake-quant
  float path (power-of-two scales: requantization is a shift)."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(16, 8)).astype(np.float32)
  w = (0.3 * rng.normal(size=(8, 5))).astype(np.float32)
  (bx, fx), (bw_, fw) = ptq.tensor_format(x, 6), ptq.tensor_format(w, 5)
  bo, fo = 7, 3
  xq, wq = ptq.fixed_point(x, bx, fx), ptq.fixed_point(w, bw_, fw)
  y = np.asarray(xq, np.float64) @ np.asarray(wq, np.float64)   # exact
  ref = ptq.codes(jnp.asarray(y, jnp.float32), bo, fo)
  out = ptq.integer_dense(ptq.codes(x, bx, fx), ptq.codes(w, bw_, fw), fx,
                          fw, bo, fo)
  np.testing.assert_array_equal(out, ref)
  assert np.abs(out).max() > 0


# ------------------------------------------------------------- searches ---

def _interaction_problem():
  """Two sites; each alone loses 0.9 points below 6 bits, together 1.8."""
  sites = [ptq.Site("w", "weight", 100, 1.0), ptq.Site("a", "act", 100, 1.0)]

  def evaluate(bw, f):
    loss = sum(0.9 for b in bw if 0 < b < 6)
    return 90.0 - loss
  return ptq.Problem(sites, [ptq.Product("w", "a", 10)], evaluate)


def test_independent_is_not_better_than_sequential_on_interaction():
  problem = _interaction_problem()
  seq = ptq.sequential_search(problem, 1.0)
  ind = ptq.independent_search(problem, 1.0)
  assert list(ind.bw) == [2, 2] and ind.drop == pytest.approx(1.8)
  assert seq.drop <= 1.0
  assert ind.acc <= seq.acc
  assert list(seq.bw) == [6, 2]   # site 1 may spend only half the budget


def test_uniform8_and_errors():
  problem = _interaction_problem()
  r = ptq.search(problem, "uniform8", 1.0)
  assert list(r.bw) == [8, 8] and list(r.f) == [7, 7]
  for bad in (0, -1.0, float("nan"), "x"):
    with pytest.raises(ValueError, match="budget"):
      ptq.search(problem, "sequential", bad)
  with pytest.raises(ValueError, match="search must be one of"):
    ptq.search(problem, "greedy", 1.0)
  with pytest.raises(ValueError, match="BW must be an integer in"):
    ptq.init_frac(1.0, 1)
  with pytest.raises(ValueError, match="max_abs"):
    ptq.init_frac(-1.0, 8)
  with pytest.raises(ValueError, match="min_bits"):
    ptq.sequential_search(problem, 1.0, min_bits=9, max_bits=8)
  with pytest.raises(ValueError, match="unique"):
    ptq.Problem([problem.sites[0]] * 2, [], problem.evaluate)


def test_formats_are_runtime_values_compiled_once():
  model = models.create("stable_resnet8", 4, quantize_activations=False,
                        quantize_weights=False)
  data = tiny_dataset(hw=8)
  x = (data.test_images[:8] / 255.0).astype(np.float32)
  variables = model.init(jax.random.PRNGKey(0), x)
  program = ptq.FlaxProgram(model, variables, x, train=False)
  kinds = {s.kind for s in program.sites}
  assert kinds == {"weight", "act"}
  # every product multiplies a weight site with an activation site
  index = {s.name: s for s in program.sites}
  assert all(index[p.weight].kind == "weight" and index[p.act].kind == "act"
             for p in program.products)
  program.calibrate(variables, [x])
  evaluate = program.accuracy_fn(
      variables, [(x, data.test_labels[:8], np.ones(8, np.float32))])
  n = len(program.sites)
  zeros = np.zeros(n, np.int32)
  for bits in (8, 4, 3):
    bw, f = ptq.uniform_formats(program.sites, bits)
    evaluate(bw, f)
  float_acc = evaluate(zeros, zeros)
  assert program.correct_fn._cache_size() == 1
  # bw = 0 everywhere is exactly the float network
  logits = program.apply(variables, x, zeros, zeros)
  np.testing.assert_array_equal(logits, model.apply(variables, x,
                                                    train=False))
  assert 0 <= float_acc <= 100


# ----------------------------------------------- real data, whole program ---

@pytest.fixture(scope="module")
def float_run(data_dir, tmp_path_factory):
  """ResNet-8 trained in float for one epoch on 256 real CIFAR-10 images."""
  data = image_data.load_image_dataset("cifar10_jpeg", str(data_dir),
                                       max_train=256, max_test=100)
  config = tiny_config(model="resnet8", precision="fp", num_epochs=1)
  config.batch_size = 32
  config.eval_batch_size = 100
  config.consistency.enabled = False
  workdir = tmp_path_factory.mktemp("fp_run")
  classify.train_and_evaluate(config, str(workdir), verbose=False,
                              dataset=data)
  return workdir, data


def test_sequential_search_stays_within_budget_on_real_data(float_run,
                                                            tmp_path):
  workdir, data = float_run
  row = ptq_cli.run_ptq(str(workdir), budget=1.0, search="sequential",
                        outdir=str(tmp_path), val_examples=200,
                        calib_examples=64, dataset=data)
  assert row["val_drop"] <= 1.0 + 1e-9
  saved = json.loads((tmp_path / "formats.json").read_text())
  bw = np.array([f["bw"] for f in saved["formats"]])
  fr = np.array([f["f"] for f in saved["formats"]])
  # an independent re-evaluation of the saved formats agrees
  config = classify.load_run_config(workdir)
  variables = classify.load_source_variables(str(workdir))
  _, problem, _ = ptq_cli.image_problem(config, variables, val_examples=200,
                                        calib_examples=64, dataset=data)
  zeros = np.zeros_like(bw)
  drop = problem.evaluate(zeros, zeros) - problem.evaluate(bw, fr)
  assert drop == pytest.approx(row["val_drop"]) and drop <= 1.0 + 1e-9
  assert row["mult_cost"] < row["mult_cost_8bit"]
  for name in ("ptq.md", "formats.json", "bits.png"):
    assert (tmp_path / name).exists()
  assert "| stem/conv/wq |" in (tmp_path / "ptq.md").read_text()


def test_cli_clear_errors(float_run, tmp_path):
  workdir, data = float_run
  with pytest.raises(ValueError, match="budget"):
    ptq_cli.run_ptq(str(workdir), budget=0.0, dataset=data)
  with pytest.raises(ValueError, match="--search must be one of"):
    ptq_cli.run_ptq(str(workdir), search="random", dataset=data)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    ptq_cli.run_ptq(str(tmp_path / "nothing"), dataset=data)
  config = json.loads((workdir / "config.json").read_text())
  fake = tmp_path / "qat"
  (fake / "checkpoints" / "0").mkdir(parents=True)
  config["quant"]["weight_bits"] = config["quant"]["act_bits"] = 4
  (fake / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="not a float run"):
    ptq_cli.run_ptq(str(fake), dataset=data)
  config["quant"]["weight_bits"] = config["quant"]["act_bits"] = 32
  config["data"]["val_fraction"] = 0.0
  (fake / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="no validation split"):
    ptq_cli.image_problem(ml_config(config), None, val_examples=10,
                          calib_examples=10, dataset=data)


def ml_config(d):
  import ml_collections  # pylint: disable=import-outside-toplevel
  return ml_collections.ConfigDict(d)


def test_encode_decode_format():
  bw, f = jnp.array([0, 2, 8, 16]), jnp.array([0, -64, 7, 64])
  got = ptq.decode_format(ptq.encode_format(bw, f))
  np.testing.assert_array_equal(got[0], bw)
  np.testing.assert_array_equal(got[1], f)


def test_gcn_on_cora_float_formats_exact_and_budget_kept(data_dir, tmp_path):
  """A 2-layer PDE-GCN trained briefly in float on Cora: all-float formats
  give the model's own output; the sequential search keeps the budget."""
  import configs.pde_gcn as gcn_configs  # pylint: disable=import-outside-toplevel
  from train import node_classify  # pylint: disable=import-outside-toplevel
  config = gcn_configs.get_config("cora,nonsym,fp")
  config.data.data_dir = str(data_dir)
  config.model.depth, config.model.width = 2, 16
  config.num_epochs, config.checkpoint_every, config.patience = 20, 10, 0
  node_classify.train_and_evaluate(config, str(tmp_path / "run"),
                                   verbose=False)
  loaded = classify.load_run_config(tmp_path / "run")
  params = ptq_cli.load_gcn_params(tmp_path / "run")
  program, problem, _ = ptq_cli.gcn_problem(loaded, params)
  assert [s.name for s in program.sites[:6]] == [
      "open/in", "open/kernel", "layer1/state", "layer1/K", "layer1/tanh",
      "layer1/K2"]
  task = node_classify.load_task(loaded)
  model = node_classify.create_model(loaded, task.num_classes)
  zeros = np.zeros(len(program.sites), np.int32)
  np.testing.assert_array_equal(
      program.apply(params, zeros, zeros),
      model.apply({"params": params}, task.features, task.graph))
  evaluate = program.accuracy_fn(params, task.labels, task.val_idx)
  for bits in (8, 3, 5):
    evaluate(*ptq.uniform_formats(program.sites, bits))
  assert program.correct_fn._cache_size() == 1
  row = ptq_cli.run_ptq(str(tmp_path / "run"), budget=1.0,
                        outdir=str(tmp_path / "ptq"))
  assert row["val_drop"] <= 1.0 + 1e-9
  assert row["float_val_acc"] > 40.0


def test_early_exit_gives_the_same_search():
  """A search whose evaluation may stop early on a rejected candidate picks
  the same formats as with full evaluations."""
  problem = _interaction_problem()
  calls = []

  def evaluate(bw, f, at_least=None):
    calls.append(at_least)
    acc = problem.evaluate(bw, f)
    return acc if at_least is None or acc >= at_least else at_least - 50.0
  early = ptq.Problem(problem.sites, problem.products, evaluate,
                      early_exit=True)
  for fn in (ptq.sequential_search, ptq.independent_search):
    a, b = fn(problem, 1.0), fn(early, 1.0)
    assert list(a.bw) == list(b.bw) and list(a.f) == list(b.f)
    assert a.acc == b.acc
  assert any(c is not None for c in calls)
