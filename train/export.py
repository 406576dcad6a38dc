"""Export a finished quantized CIFAR (or PDE-GCN) run as an integer model.

    python -m train.export --workdir=runs/resnet20_4w4a --format=onnx \
        --output=export_dir [--which=best] [--max_test=0]

Writes ``<output>/model.onnx`` (or ``model.stablehlo``), the compact
checkpoint ``model.pdeq`` and ``deploy.md``: per-layer bits, scales,
accumulator bounds (worst case from code ranges and fan-in, from the weights,
and the largest value seen on the test set) and safe widths, sizes, MACs by
bit width, and on the test set: the test accuracy of the fake-quant model,
the JAX integer path and the exported model, the top-1 agreement (with the
disagreement count) and the number of exported logits that differ from the
JAX integer path.

A PDE-GCN node-classification run (``quant.weight_bits`` 2..8) exports
through :mod:`pdeq_jax.deploy.gcn`: the model's input is layer 0's int32
state codes (the float opening layer stays outside, see ``docs/deploy.md``),
and ``deploy.md`` reports the test-node accuracy of each path, the
disagreements, the exported logit mismatches, per-layer scales and the
accumulator bounds against the largest values seen on the whole graph.
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any, Dict

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from pdeq_jax import layers
from pdeq_jax.data import images as image_data
from pdeq_jax.deploy import convert as convert_lib
from pdeq_jax.deploy import gcn as gcn_lib
from pdeq_jax.deploy import pack
from pdeq_jax.deploy import program as prog
from train import classify
from train import cli
from train import common
from train import node_classify

FLAGS = flags.FLAGS
FORMATS = ("onnx", "stablehlo")
TASKS = ("image_classification", "node_classification")


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  fv = {"flag_values": flag_values}
  flags.DEFINE_string("workdir", None, "A finished quantized run.", **fv)
  flags.DEFINE_enum("format", "onnx", list(FORMATS), "Exported model.", **fv)
  flags.DEFINE_string("output", None, "Directory for the exported files.",
                      **fv)
  flags.DEFINE_enum("which", "best", ["best", "final"], "Model of the run.",
                    **fv)
  flags.DEFINE_integer("max_test", 0, "Test images to evaluate (0: all).",
                       **fv)
  flags.DEFINE_integer("batch_size", 500, "Evaluation batch size.", **fv)
  flags.DEFINE_bool("allow_unfinished", False, "Export the latest checkpoint "
                    "of a run that has not finished (its current bits).", **fv)


class ExportError(ValueError):
  """A run that cannot be exported (one line saying why)."""


def load_run(workdir: str, which: str = "best",
             allow_unfinished: bool = False):
  """Config, variables, bits and a note of a finished quantized run.

  ``allow_unfinished``: a run still training exports its latest checkpoint
  (the current weights, at the bits of the epoch it is in).
  """
  path = pathlib.Path(workdir)
  config = classify.load_run_config(path)  # clear errors for a bad workdir
  if config.task not in TASKS:
    raise ExportError(f"config.task={config.task!r} does not export "
                      f"(allowed: {', '.join(TASKS)})")
  graph = config.task == "node_classification"
  if graph and int(config.quant.weight_bits) > 8:
    raise ExportError(
        f"{path} is a PDE-GCN run with float weights (config.quant."
        f"weight_bits={int(config.quant.weight_bits)}, as the Table 7 rows):"
        " the integer form needs quantized K; train with "
        "--config.quant.weight_bits=4 (or 2..8)")
  finished = (path / "results.json").is_file()
  if not finished and not allow_unfinished:
    raise ExportError(f"{path} is an unfinished run (no results.json): "
                      "export the run once training has finished")
  final = common.bits_for_epoch(config, int(config.num_epochs) - 1)
  for field, value in zip(("weight_bits", "act_bits"), final):
    if int(value) > 8:
      raise ExportError(
          f"{path} is a float run (config.quant.{field} ends at "
          f"{int(value)} bits, i.e. no integer grid); allowed: 2..8 bits")
  if graph:
    variables, bits, note = _gcn_variables(path, config, which, finished)
  elif finished:
    variables = classify.load_source_variables(str(path), which)
    bits, note = final, f"finished run, {which} model"
  else:
    ckpt = common.Checkpointer(path / "checkpoints")
    step = ckpt.latest_step()
    tree = ckpt.restore_raw()
    ckpt.close()
    state = tree["state"]
    variables = {"params": state["params"], **state["model_state"]}
    num_train = len(classify.load_data(config).train_labels)
    epoch = step // image_data.steps_per_epoch(num_train,
                                               int(config.batch_size))
    bits = common.bits_for_epoch(config, epoch)
    note = (f"UNFINISHED run: latest checkpoint (step {step}, epoch "
            f"{epoch + 1} of {config.num_epochs}), its current weights")
  variables = jax.tree_util.tree_map(jnp.asarray, variables)
  return config, variables, (int(bits.weights), int(bits.activations)), note


def _gcn_variables(path, config, which, finished):
  """A node-classification checkpoint (its ``best`` or latest params)."""
  ckpt = common.Checkpointer(path / "checkpoints")
  step = ckpt.latest_step()
  tree = ckpt.restore_raw()
  ckpt.close()
  best_epoch = int(np.asarray(tree["best"]["epoch"]))
  if finished:
    final = common.bits_for_epoch(config, int(config.num_epochs) - 1)
    if which == "best" and best_epoch >= 0:
      return ({"params": tree["best"]["params"]}, final,
              f"finished run, best model (epoch {best_epoch})")
    return {"params": tree["params"]}, final, "finished run, final model"
  bits = common.bits_for_epoch(config, max(int(step) - 1, 0))
  return ({"params": tree["params"]}, bits,
          f"UNFINISHED run: latest checkpoint (epoch {step} of "
          f"{config.num_epochs}), its current weights")


def _safe_width(value) -> Any:
  """The smallest signed accumulator width (16/24/32/64) holding |value|."""
  return next((b for b in (16, 24, 32, 64) if value <= 2 ** (b - 1) - 1),
              None)


def _macs(program) -> Dict[str, int]:
  """Multiply-accumulates per image, by (weight bits x activation bits)."""
  out: Dict[str, int] = {}
  shapes = {"input": program["image_shape"]}
  for op in program["ops"]:
    if op["op"] == "conv":
      w = program["weights"][op["weight"]]
      k = prog.transpose_kernel(w, op.get("groups", 1)) if op["transpose"] \
          else w
      kh, kw, cin, cout = k.shape  # cin: per group
      h, wd, _ = shapes[op["input"]]
      (p0, p1), (q0, q1) = prog.conv_padding(op, w)
      s = op["stride"]
      ho, wo = (h + p0 + p1 - kh) // s + 1, (wd + q0 + q1 - kw) // s + 1
      shapes[op["output"]] = (ho, wo, cout)
      lo, hi = op["input_range"]
      abits = int(np.ceil(np.log2(hi - lo + 1)))
      key = (f"{program['weight_meta'][op['weight']]['bits']}W x "
             f"{abits}A")
      out[key] = out.get(key, 0) + ho * wo * cout * kh * kw * cin
    elif op["op"] == "requant":
      first = op["parts"][0]["terms"][0]["input"]
      h, wd, _ = shapes[first]
      c = sum(len(p["bias"]) for p in op["parts"])
      shapes[op["output"]] = (h // 2, wd // 2, c) if op["pool"] else (h, wd, c)
    else:
      w = np.asarray(op["weight"])
      out["float head"] = out.get("float head", 0) + w.size
  return out


def evaluate(model, variables, program, config, batches, bits, session=None):
  """Predictions, logit equality and accumulator maxima over ``batches``."""
  qbits = layers.QuantBits.make(*bits)
  fake = jax.jit(lambda x: model.apply(variables, x, qbits))
  convs = [op["output"] for op in program["ops"] if op["op"] == "conv"]

  @jax.jit
  def integer_jit(x):
    logits, env = prog.run(program, x, return_intermediates=True)
    return logits, {k: jnp.max(jnp.abs(env[k])) for k in convs}

  def integer(x):
    with jax.enable_x64(True):  # the stem's int64 accumulator
      logits, maxima = integer_jit(x)
      return np.asarray(logits), {k: int(v) for k, v in maxima.items()}

  stats = {"count": 0, "correct_fake": 0, "correct_int": 0,
           "correct_export": 0, "disagree": 0, "export_logit_mismatch": 0,
           "export_disagree": 0, "acc_max": {k: 0 for k in convs},
           "seconds": {"fake": 0.0, "int": 0.0, "export": 0.0}}
  for x, y, mask in batches:
    keep = np.asarray(mask, bool)
    x = np.asarray(x, np.float32)
    t = time.perf_counter()
    f = np.asarray(fake(x))
    stats["seconds"]["fake"] += time.perf_counter() - t
    t = time.perf_counter()
    logits, maxima = integer(x)
    logits = np.asarray(logits)
    stats["seconds"]["int"] += time.perf_counter() - t
    t = time.perf_counter()
    e = session(x) if session is not None else logits
    stats["seconds"]["export"] += time.perf_counter() - t
    y = np.asarray(y)[keep]
    pf, pi, pe = (np.argmax(a[keep], -1) for a in (f, logits, e))
    stats["count"] += int(keep.sum())
    stats["correct_fake"] += int((pf == y).sum())
    stats["correct_int"] += int((pi == y).sum())
    stats["correct_export"] += int((pe == y).sum())
    stats["disagree"] += int((pf != pi).sum())
    stats["export_disagree"] += int((pe != pi).sum())
    stats["export_logit_mismatch"] += int(
        (np.asarray(e)[keep] != logits[keep]).any(axis=-1).sum())
    for k, v in maxima.items():
      stats["acc_max"][k] = max(stats["acc_max"][k], int(v))
  return stats


def export(workdir: str, fmt: str, output: str, *, which: str = "best",
           max_test: int = 0, batch_size: int = 500,
           allow_unfinished: bool = False) -> Dict[str, Any]:
  """Runs the export (see the module docstring); returns the summary."""
  if fmt not in FORMATS:
    raise ExportError(f"--format={fmt!r}; allowed: {', '.join(FORMATS)}")
  config, variables, bits, note = load_run(workdir, which, allow_unfinished)
  if config.task == "node_classification":
    return _export_gcn(config, variables, bits, note, workdir, fmt, output)
  data = classify.load_data(config)
  model = classify.create_model(config, data.num_classes)
  program = convert_lib.convert(model, variables, bits, data.mean, data.std,
                                data.test_images.shape[1:])
  out = pathlib.Path(output)
  sizes, model_file, run_export = _save(program, variables, fmt, out, "x")
  test_images, test_labels = data.test_images, data.test_labels
  if max_test and max_test < len(test_labels):
    idx = np.sort(image_data.balanced_subset(test_labels, max_test, 0))
    test_images, test_labels = test_images[idx], test_labels[idx]
  batches = image_data.eval_batches(test_images, test_labels, batch_size,
                                    mean=data.mean, std=data.std)
  stats = evaluate(model, variables, program, config, batches, bits,
                   run_export)
  summary = {"workdir": str(workdir), "which": note, "format": fmt,
             "bits": {"weights": bits[0], "activations": bits[1]},
             **sizes, "model_file": model_file.name,
             "model_bytes": model_file.stat().st_size,
             "macs": _macs(program), **{k: v for k, v in stats.items()}}
  common.write_json(out / "summary.json", summary)
  text = deploy_markdown(program, summary)
  common.write_text(out / "deploy.md", text)
  print(text)
  return summary


def _save(program, variables, fmt, out: pathlib.Path, input_name: str):
  """Writes the compact checkpoint and the model; returns the sizes, the
  model file and ``x -> logits`` of the exported model."""
  out.mkdir(parents=True, exist_ok=True)
  sizes = {"compact_bytes": pack.save(program, out / "model.pdeq"),
           "compact_packed_bytes": len(pack.serialize(program, deflate=False)),
           "float32_bytes": pack.float_checkpoint_bytes(variables)}
  if fmt == "onnx":
    from pdeq_jax.deploy import onnx_export  # pylint: disable=import-outside-toplevel
    onnx_export.save(program, str(out / "model.onnx"))
    model_file = out / "model.onnx"
    sess = onnx_export.session(str(model_file), intra_op_threads=1 if
                               program.get("model") == "PDEGCN" else 0)
    run_export = lambda x: sess.run(None, {input_name: x})[0]
  else:
    from pdeq_jax.deploy import stablehlo  # pylint: disable=import-outside-toplevel
    model_file = out / "model.stablehlo"
    stablehlo.save(program, model_file)
    loaded = stablehlo.load(model_file)
    run_export = lambda x: np.asarray(loaded(jnp.asarray(x)))
  return sizes, model_file, run_export


def _export_gcn(config, variables, bits, note, workdir, fmt, output):
  """The PDE-GCN export (see the module docstring); returns the summary."""
  task = node_classify.load_task(config)
  model = node_classify.create_model(config, task.num_classes)
  program = gcn_lib.convert(model, variables, task.graph, bits)
  out = pathlib.Path(output)
  sizes, model_file, run_export = _save(program, variables, fmt, out, "q")
  stats = evaluate_gcn(model, variables, program, task, bits, run_export)
  p = variables["params"]
  alpha = lambda name: [float(a) for a in np.asarray(
      layers.positive_alpha(jnp.asarray(p[name], jnp.float32)))]
  summary = {"workdir": str(workdir), "which": note, "format": fmt,
             "task": "node_classification", "dataset": config.data.name,
             "symmetric": bool(config.model.symmetric),
             "bits": {"weights": bits[0], "activations": bits[1]},
             **sizes, "float_open_bytes": int(
                 np.asarray(program["open_kernel"]).nbytes),
             "model_file": model_file.name,
             "model_bytes": model_file.stat().st_size,
             "alpha_state": alpha("alpha_state"),
             "alpha_act": alpha("alpha_act"), "macs": _gcn_macs(program),
             **stats}
  common.write_json(out / "summary.json", summary)
  text = gcn_markdown(program, summary)
  common.write_text(out / "deploy.md", text)
  print(text)
  return summary


def _gcn_macs(program) -> Dict[str, int]:
  """Multiply(-accumulate)s of one full-graph inference, by operand kind."""
  g, wb, ab = program["graph"], program["bits"]["weights"], program["bits"][
      "activations"]
  n, edges = g["num_nodes"], len(g["senders"])
  feats, width = np.shape(program["open_kernel"])
  depth = len(program["layers"])
  classes = np.shape(program["layers"][-1]["head_weight"])[1]
  return {"float opening Dense (dense features)": n * feats * width,
          f"{wb}W x {ab}A (a = q K)": depth * n * width * width,
          "int64 edge weights x int32 (d W_e) and x codes (e W_e)":
              depth * 2 * edges * width,
          f"{wb}W x int64 (z = Y Kᵀ / Y K₂)": depth * n * width * width,
          "float closing Dense": n * width * classes}


def evaluate_gcn(model, variables, program, task, bits, run_export):
  """Test-node accuracy of the three paths, disagreements, exported logit
  mismatches and per-layer accumulator maxima (one full-graph inference)."""
  qbits = layers.QuantBits.make(*bits)
  t = time.perf_counter()
  fake, hidden = jax.jit(lambda v, f, g: model.apply(
      v, f, g, qbits, return_hidden=True))(variables, task.features,
                                            task.graph)
  fake = np.asarray(fake)
  seconds = {"fake": time.perf_counter() - t}
  features = task.features
  if isinstance(features, node_classify.SparseFeatures):
    features = features.todense()
  t = time.perf_counter()
  q0 = np.asarray(gcn_lib.input_codes(program, features))
  logits, env = gcn_lib.run(program, q0, return_intermediates=True)
  logits = np.asarray(logits)
  seconds["int"] = time.perf_counter() - t
  t = time.perf_counter()
  exported = np.asarray(run_export(q0))
  seconds["export"] = time.perf_counter() - t
  # layer 0's codes as the fake-quant model quantized them (odd, [-L, L])
  levels = program["input"]["levels"]
  alpha0 = float(layers.positive_alpha(
      jnp.asarray(variables["params"]["alpha_state"], jnp.float32))[0])
  fake_q0 = np.round(np.asarray(hidden[0], np.float64) * levels / alpha0)
  test = np.asarray(task.test_idx)
  labels = np.asarray(task.labels)
  pf, pi, pe = (np.argmax(a, -1) for a in (fake, logits, exported))
  mismatch = (exported != logits).any(axis=-1)
  acc_max = {}
  for j in range(len(program["layers"])):
    for part in ("a", "y", "z"):
      acc_max[f"layer{j}/{part}"] = int(np.abs(np.asarray(
          env[f"layer{j}/{part}"])).max())
  return {"count": int(test.size), "nodes": int(labels.size),
          "correct_fake": int((pf[test] == labels[test]).sum()),
          "correct_int": int((pi[test] == labels[test]).sum()),
          "correct_export": int((pe[test] == labels[test]).sum()),
          "disagree": int((pf[test] != pi[test]).sum()),
          "disagree_all_nodes": int((pf != pi).sum()),
          "export_disagree": int((pe[test] != pi[test]).sum()),
          "export_logit_mismatch": int(mismatch[test].sum()),
          "export_logit_mismatch_all_nodes": int(mismatch.sum()),
          "input_code_mismatch_nodes": int((fake_q0 != q0).any(-1).sum()),
          "acc_max": acc_max, "seconds": seconds}


GCN_FLOAT_PARTS = (
    "What stays float, and why: the opening Dense + ReLU and layer 0's state "
    "quantizer (the input quantization: the bag-of-words features and the "
    "opening weights are float in the trained model; `gcn.input_codes`, not "
    "part of the exported model, whose input is layer 0's int32 codes, "
    "because float32 matmuls over 1433 features round differently across "
    "runtimes), and the closing Dense (the logits' dequantization, a fixed "
    "order of float32 multiply-adds of integer features).  Everything in "
    "between is integer: `a = q K` (int32), the graph gradient and its tanh "
    "quantizer as integer thresholds on `P = d W_e` (int64; the edge "
    "weights `1/sqrt(d_i d_j)` as 31-bit fixed point), `Sᵀ` and `Kᵀ` "
    "(int64), the requantization to the next layer's codes (int64 "
    "multipliers, rounding to nearest, ties to even).")


def _sizes_table(s, float_label: str, model_label: str) -> str:
  """The sizes of the float variables, the compact checkpoint (deflated and
  raw packed) and the exported model, each against the float variables."""
  fb = s["float32_bytes"]
  return common.markdown_table(
      ["file", "bytes", "vs float32 variables"],
      [[float_label, fb, "1"],
       ["compact checkpoint `model.pdeq` (deflated)", s["compact_bytes"],
        f"1/{fb / s['compact_bytes']:.2f}"],
       ["the same, raw packed (`deflate=False`)", s["compact_packed_bytes"],
        f"1/{fb / s['compact_packed_bytes']:.2f}"],
       [model_label, s["model_bytes"], f"1/{fb / s['model_bytes']:.2f}"]])


def gcn_markdown(program, s) -> str:
  n, nodes = s["count"], s["nodes"]
  acc = lambda k: f"{100 * s[k] / max(n, 1):.2f}"
  lines = [f"# Integer export of `{s['workdir']}` ({s['which']})", "",
           f"PDE-GCN ({'symmetric' if s['symmetric'] else 'non-symmetric'})"
           f" on {s['dataset']}: {s['bits']['weights']}-bit weights, "
           f"{s['bits']['activations']}-bit activations; format "
           f"{s['format']} (`{s['model_file']}`, input: layer 0's int32 "
           "codes).", "", "## Test nodes", "",
           common.markdown_table(
               ["path", "test accuracy %", "top-1 disagreements with the "
                "integer path"],
               [["fake-quant model (JAX, float)", acc("correct_fake"),
                 f"{s['disagree']} / {n}"],
                ["integer program (JAX, int32/int64)", acc("correct_int"),
                 "0"],
                [f"exported ({s['format']})", acc("correct_export"),
                 f"{s['export_disagree']} / {n}"]]), "",
           f"Integer path vs fake-quant model: {s['disagree']} of {n} test "
           f"nodes disagree ({s['disagree_all_nodes']} of {nodes} nodes of "
           f"the graph); layer 0's input codes (float opening layer, dense "
           f"matmul here, the model's own in training) differ on "
           f"{s['input_code_mismatch_nodes']} nodes.  Exported logits that "
           f"differ from the JAX integer path in any entry: "
           f"{s['export_logit_mismatch']} of {n} test nodes "
           f"({s['export_logit_mismatch_all_nodes']} of {nodes} nodes).", "",
           "## Sizes", "",
           _sizes_table(s, "float32 variables (params)",
                        f"`{s['model_file']}` (graph included, no opening "
                        "layer)"), "",
           f"The float opening kernel alone is {s['float_open_bytes']} bytes "
           "of the compact checkpoint (float32, as trained); the compact "
           "checkpoint also holds the graph (senders, receivers, fixed-point "
           "edge weights).", "",
           "## Multiplies per full-graph inference", "",
           common.markdown_table(["operands", "count"],
                                 [[k, v] for k, v in s["macs"].items()]), "",
           "## Layers and accumulators", "",
           "`a = q K`: int32, bound `L * max_o sum|K codes|`; `z = Y Kᵀ` (or "
           "`Y K₂`): int64, bound from the edge codes, the fixed-point edge "
           "weights and `sum|K codes|`; `observed`: largest |value| over "
           "all nodes of the graph (`y = Sᵀ e`: observed only).  Safe width: "
           "the smallest signed width holding the bound.", ""]
  rows = []
  for j, op in enumerate(program["layers"]):
    meta = program["weight_meta"]
    scale = f"{meta[op['K']]['scale']:.4g}"
    if op["Z"] != op["K"]:
      scale += f" / K₂ {meta[op['Z']]['scale']:.4g}"
    am = s["acc_max"]
    rows.append([j, meta[op["K"]]["bits"], scale,
                 f"{2 * s['alpha_state'][j] / program['input']['levels']:.4g}",
                 f"{s['alpha_act'][j]:.4g}", int(op["a_bound"]),
                 am[f"layer{j}/a"], _safe_width(op["a_bound"]),
                 am[f"layer{j}/y"], int(op["z_bound"]), am[f"layer{j}/z"],
                 _safe_width(op["z_bound"]),
                 op.get("shift", f"head, post {op.get('post_shift')}")])
  lines.append(common.markdown_table(
      ["layer", "w bits", "K scale", "state step", "act α (tanh)",
       "a bound", "a observed", "a safe width", "y observed", "z bound",
       "z observed", "z safe width", "F"], rows))
  lines += ["", GCN_FLOAT_PARTS, "",
            "Timing of this evaluation (seconds, one full-graph inference, "
            "including compilation; not a benchmark): " + json.dumps(
                {k: round(v, 2) for k, v in s["seconds"].items()}), ""]
  return "\n".join(lines)


def deploy_markdown(program, s) -> str:
  n = s["count"]
  acc = lambda k: f"{100 * s[k] / max(n, 1):.2f}"
  lines = [f"# Integer export of `{s['workdir']}` ({s['which']})", "",
           f"{s['bits']['weights']}-bit weights, {s['bits']['activations']}"
           f"-bit activations; format {s['format']} (`{s['model_file']}`).",
           "", "## Test set", "",
           common.markdown_table(
               ["path", "test accuracy %", "top-1 disagreements with the "
                "integer path"],
               [["fake-quant model (JAX, float)", acc("correct_fake"),
                 f"{s['disagree']} / {n}"],
                ["integer program (JAX, int32)", acc("correct_int"), "0"],
                [f"exported ({s['format']})", acc("correct_export"),
                 f"{s['export_disagree']} / {n}"]]), "",
           f"Agreement of the integer path with the fake-quant model: "
           f"{100 * (1 - s['disagree'] / max(n, 1)):.3f}% "
           f"({s['disagree']} of {n} test images disagree).  Exported logits "
           f"that differ from the JAX integer path in any entry: "
           f"{s['export_logit_mismatch']} of {n} images.", "",
           "## Sizes", "",
           _sizes_table(s, "float32 variables (params + BN statistics)",
                        f"`{s['model_file']}`"), "",
           "## MACs per image by bit width", "",
           common.markdown_table(["operands", "MACs"],
                                 [[k, v] for k, v in s["macs"].items()]), "",
           "## Accumulators", "",
           "`bound codes`: worst case from the code ranges and the fan-in "
           "(any weights); `bound weights`: `max|x| * max_o sum|w|` for these "
           "weights; `observed`: largest |accumulator| on the test images.  "
           "A width is safe when the bound fits a signed accumulator of that "
           "many bits.", ""]
  rows = []
  for r in prog.accumulator_stats(program):
    seen = s["acc_max"].get(r["layer"], 0)
    obs_bits = _safe_width(seen)
    op = next(o for o in program["ops"] if o.get("output") == r["layer"])
    meta = program["weight_meta"][op["weight"]]
    scale = meta["scale"]
    scale = (f"{scale:.4g}" if isinstance(scale, float)
             else f"per channel {min(scale):.3g}..{max(scale):.3g}")
    rows.append([r["layer"] + (" (Kᵀ)" if op["transpose"] else ""),
                 meta["bits"], scale, f"{op['input_range'][0]}..{op['input_range'][1]}",
                 r["fan_in"], r["bound_codes"], r["bound_weights"], seen,
                 r["safe_bits"], r["safe_bits_weights"], obs_bits,
                 "yes" if r["bound_codes"] <= 2 ** 15 - 1 else "**no**"])
  lines.append(common.markdown_table(
      ["layer", "w bits", "w scale", "input codes", "fan-in", "bound codes",
       "bound weights", "observed", "safe width (codes)",
       "safe width (weights)", "width for observed", "16-bit safe?"], rows))
  lines += ["", "## Requantization", "",
            "Per layer: output code range, activation step and fixed-point "
            "shift F (multipliers `round(c 2^F)`, rounding to nearest, ties "
            "to even).", ""]
  rq = [[op["output"], f"{op['range'][0]}..{op['range'][1]}",
         f"{op['step']:.4g}", op["shift"], "yes" if op["pool"] else ""]
        for op in program["ops"] if op["op"] == "requant"]
  head = program["ops"][-1]
  rq.append(["head (integer sum, float Dense)", "-", "-",
             f"{head['shift']} (+{head['post_shift']} before the sum)", ""])
  lines.append(common.markdown_table(
      ["output", "codes", "step", "F", "2x2 pool"], rq))
  lines += ["", "Timing of this evaluation (seconds, whole test set, not a "
            "benchmark): " + json.dumps({k: round(v, 1) for k, v in
                                         s["seconds"].items()}), ""]
  return "\n".join(lines)


def main(argv):
  common.quiet_absl_logging()
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.workdir or not FLAGS.output:
    raise ValueError("--workdir and --output are required")
  export(FLAGS.workdir, FLAGS.format, FLAGS.output, which=FLAGS.which,
         max_test=FLAGS.max_test, batch_size=FLAGS.batch_size,
         allow_unfinished=FLAGS.allow_unfinished)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
