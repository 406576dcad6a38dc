"""Every row of docs/bad_inputs.md: the input, driven through the program's
command line (in-process: ``train.cli.invoke``), prints exactly the
documented one-line message and exits with status 2, with no traceback.

Regenerate the table after changing a message or adding a case:

    python -m tests.test_bad_inputs > docs/bad_inputs.md
"""

from __future__ import annotations

import importlib
import io
import os
import pathlib
import re
import shutil
import sys
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

from absl import flags
import pytest

from train import cli

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = REPO_ROOT / "docs" / "bad_inputs.md"
PROGRAMS = {"train.main": "train.main", "train.sweep": "train.sweep",
            "train.reproduce": "train.reproduce",
            "train.consistency_report": "train.consistency_report",
            "train.fig2_tv": "train.fig2_tv"}

GCN = ["--config=configs/pde_gcn.py:cora,sym,4w4a",
       "--config.data.data_dir={data}/planetoid", "--workdir={tmp}/run"]
TINY_GCN = ["--config.model.depth=2", "--config.model.width=8",
            "--config.num_epochs=2", "--config.checkpoint_every=1"]
CNN = ["--config=configs/cifar.py:resnet20,cifar10_jpeg,4w4a,cpu",
       "--workdir={tmp}/run"]
PIPE = ["--config=configs/tv_pipeline.py:resnet20,cifar100,4w4a,cpu",
        "--workdir={tmp}/run"]
SWEEP = ["--config=configs/pde_gcn.py:cora,sym,4w4a",
         "--workdir={tmp}/sweep"]


class Case(NamedTuple):
  id: str
  program: str
  argv: List[str]
  setup: Optional[str] = None  # name of a setup function below


def _c(id_, program, argv, setup=None):
  return Case(id_, program, argv, setup)


CASES = [
    # ------------------------------------------------ train.main, GCN ---
    _c("gcn_negative_h", "train.main", GCN + ["--config.model.h=-1"]),
    _c("unknown_key", "train.main", GCN + ["--config.nope=1"]),
    _c("unknown_nested_key", "train.main", GCN + ["--config.model.nope=3"]),
    _c("wrong_type", "train.main", GCN + ["--config.model.h=abc"]),
    _c("act_bits_1", "train.main", GCN + ["--config.quant.act_bits=1"]),
    _c("weight_bits_20", "train.main", GCN + ["--config.quant.weight_bits=20"]),
    _c("gradual_never_reaches_target", "train.main",
       GCN + ["--config.quant.gradual=True", "--config.num_epochs=50"]),
    _c("gradual_from_float", "train.main",
       GCN + ["--config.quant.gradual=True", "--config.quant.start_bits=32"]),
    _c("dropout_1", "train.main", GCN + ["--config.model.dropout_in=1.0"]),
    _c("lr_0", "train.main", GCN + ["--config.optim.lr=0"]),
    _c("negative_lr_alpha", "train.main",
       GCN + ["--config.optim.lr_alpha=-0.001"]),
    _c("epochs_0", "train.main", GCN + ["--config.num_epochs=0"]),
    _c("patience_negative", "train.main", GCN + ["--config.patience=-1"]),
    _c("depth_0", "train.main", GCN + ["--config.model.depth=0"]),
    _c("unknown_dataset", "train.main", GCN + ["--config.data.name=reddit"]),
    _c("unknown_model", "train.main", GCN + ["--config.model.name=gat"]),
    _c("unknown_grid", "train.main", GCN + ["--config.model.grid=log"]),
    _c("bad_config_arg", "train.main",
       ["--config=configs/pde_gcn.py:corra,sym,fp", "--workdir={tmp}/run"]),
    _c("missing_config_file", "train.main",
       ["--config=configs/nope.py", "--workdir={tmp}/run"]),
    _c("missing_workdir_flag", "train.main", GCN[:2]),
    _c("unexpected_argument", "train.main", GCN + ["extra"]),
    # --------------------------------------- train.main, image / pipeline ---
    _c("cnn_negative_lr", "train.main", CNN + ["--config.optim.lr=-0.1"]),
    _c("cnn_batch_0", "train.main", CNN + ["--config.batch_size=0"]),
    _c("cnn_unknown_model", "train.main",
       ["--config=configs/cifar.py:resnet21,cifar10_jpeg,fp",
        "--workdir={tmp}/run"]),
    _c("cnn_unknown_dataset", "train.main",
       ["--config=configs/cifar.py:resnet20,mnist,fp", "--workdir={tmp}/run"]),
    _c("cnn_bad_precision", "train.main",
       ["--config=configs/cifar.py:resnet20,cifar10_jpeg,4bits",
        "--workdir={tmp}/run"]),
    _c("cnn_momentum_1", "train.main", CNN + ["--config.optim.momentum=1.0"]),
    _c("cnn_val_fraction_1", "train.main",
       CNN + ["--config.data.val_fraction=1.0"]),
    _c("cnn_unknown_schedule", "train.main",
       CNN + ["--config.optim.schedule=linear"]),
    _c("stable_h_0", "train.main",
       ["--config=configs/cifar.py:stable_resnet20,cifar10_jpeg,fp",
        "--workdir={tmp}/run", "--config.model.h=0"]),
    _c("init_from_missing", "train.main",
       CNN + ["--config.init_from={tmp}/nothing"]),
    _c("tv_gamma_2", "train.main",
       PIPE + ["--config.tv_finetune.model.tv_gamma_init=2.0"]),
    _c("stage_input_later_stage", "train.main",
       PIPE + ["--config.stage_inputs.quantize=tv_finetune"]),
    # ------------------------------------ train.main, data and workdirs ---
    _c("planetoid_truncated_file", "train.main",
       ["--config=configs/pde_gcn.py:cora,sym,4w4a",
        "--config.data.data_dir={tmp}/planetoid", "--workdir={tmp}/run"],
       "corrupt_planetoid"),
    _c("imagefolder_truncated_jpeg", "train.main",
       ["--config=configs/cifar.py:resnet8,imagefolder:{tmp}/tree,fp",
        "--config.data.cache_dir={tmp}/cache", "--workdir={tmp}/run"],
       "truncated_jpeg"),
    _c("imagefolder_non_image_file", "train.main",
       ["--config=configs/cifar.py:resnet8,imagefolder:{tmp}/tree,fp",
        "--config.data.cache_dir={tmp}/cache", "--workdir={tmp}/run"],
       "non_image_file"),
    _c("workdir_other_config", "train.main",
       GCN + TINY_GCN + ["--config.model.h=0.25"], "trained_run"),
    _c("corrupt_checkpoint", "train.main", GCN + TINY_GCN,
       "corrupt_checkpoint"),
    _c("workdir_is_a_file", "train.main", GCN, "workdir_file"),
    # ------------------------------------------------------- train.sweep ---
    _c("sweep_trials_0", "train.sweep", SWEEP + ["--trials=0"]),
    _c("sweep_unknown_space", "train.sweep", SWEEP + ["--space=everything"]),
    _c("sweep_unknown_sampler", "train.sweep", SWEEP + ["--sampler=grid"]),
    _c("sweep_seeds_per_trial_0", "train.sweep",
       SWEEP + ["--seeds_per_trial=0"]),
    _c("sweep_image_config", "train.sweep",
       ["--config=configs/cifar.py:resnet20,cifar10_jpeg,fp",
        "--workdir={tmp}/sweep"]),
    _c("sweep_bad_base_config", "train.sweep",
       SWEEP + ["--config.optim.weight_decay=-1"]),
    _c("sweep_trials_not_integer", "train.sweep", SWEEP + ["--trials=many"]),
    # --------------------------------------------------- train.reproduce ---
    _c("reproduce_unknown_table", "train.reproduce",
       ["table8", "--workdir={tmp}/t"]),
    _c("reproduce_unknown_dataset", "train.reproduce",
       ["table7", "--datasets=reddit", "--workdir={tmp}/t"]),
    _c("reproduce_unknown_precision", "train.reproduce",
       ["table7", "--precisions=3w3a", "--workdir={tmp}/t"]),
    _c("reproduce_unknown_form", "train.reproduce",
       ["table7", "--forms=both", "--workdir={tmp}/t"]),
    _c("reproduce_seeds_0", "train.reproduce",
       ["table7", "--seeds=0", "--workdir={tmp}/t"]),
    _c("reproduce_bad_pair", "train.reproduce",
       ["cnn", "--pairs=resnet56", "--workdir={tmp}/t"]),
    _c("reproduce_epochs_below_schedule", "train.reproduce",
       ["cnn", "--pairs=resnet20:stable_resnet20", "--precisions=4w4a",
        "--num_epochs=20", "--workdir={tmp}/t"]),
    # ------------------------------------------- post-training programs ---
    _c("consistency_float_run", "train.consistency_report",
       ["--workdirs={tmp}/fp_run", "--output={tmp}/out"], "float_run"),
    _c("consistency_missing_run", "train.consistency_report",
       ["--workdirs={tmp}/nothing", "--output={tmp}/out"]),
    _c("consistency_run_without_checkpoint", "train.consistency_report",
       ["--workdirs={tmp}/fp_run", "--output={tmp}/out"], "untrained_run"),
    _c("consistency_negative_examples", "train.consistency_report",
       ["--workdirs={tmp}/fp_run", "--output={tmp}/out",
        "--max_examples=-1"]),
    _c("fig2_missing_run", "train.fig2_tv",
       ["--workdir={tmp}/nothing", "--output_dir={tmp}/out"]),
    _c("fig2_negative_gamma", "train.fig2_tv",
       ["--workdir={tmp}/nothing", "--output_dir={tmp}/out",
        "--gamma_sq=-1"]),
    _c("fig2_bad_bits", "train.fig2_tv",
       ["--workdir={tmp}/nothing", "--output_dir={tmp}/out", "--bits=1"]),
    _c("fig2_steps_not_integers", "train.fig2_tv",
       ["--workdir={tmp}/nothing", "--output_dir={tmp}/out", "--steps=a,b"]),
]

# Rows tested elsewhere (library entry points), listed in the same table.
OTHER_ROWS = [
    ("torchvision_wrong_shape", "pdeq_jax.torchvision_import",
     "a ResNet-50 state dict with `layer1.0.conv2.weight` of shape "
     "(4, 4, 1, 1)", "state dict does not match the model: ... shape "
     "mismatches (1): layer1.0.conv2.weight: torch (4, 4, 1, 1) -> ... "
     "(every mismatched key, the first one first)",
     "tests/test_resnet50_deeplab.py::"
     "test_import_errors_list_missing_unexpected_and_mismatched"),
    ("traced_bits_below_2", "train.node_classify / train.classify",
     "bits `QuantBits(int32(32), int32(1))` passed to a trainer's step or "
     "evaluation", "runtime bit width out of range (bits.activations = 1; "
     "allowed: [2, 32], 32 = clip only)",
     "tests/test_nan_stop.py::"
     "test_traced_bits_below_two_rejected_where_they_enter"),
    ("nan_loss_gcn", "train.main (GCN)",
     "a NaN loss at the 5th epoch (injected)",
     "training diverged: loss = nan at epoch 4 (step 5); the last good "
     "checkpoint (step 4) is kept; no results.json written (...)",
     "tests/test_nan_stop.py::test_gcn_stops_on_non_finite"),
    ("nan_weights_image", "train.main (image)",
     "NaN weights after step 6 (injected)",
     "training diverged: parameters = nan at step 6 (epoch 1.50); the last "
     "good checkpoint (step 4) is kept; no results.json written (...)",
     "tests/test_nan_stop.py::test_image_trainer_stops_on_non_finite"),
]


# ------------------------------------------------------------- setups ---

def _trained_run(tmp: pathlib.Path, data: pathlib.Path) -> None:
  status, err = run_program("train.main", _fill(GCN + TINY_GCN, tmp, data))
  assert status == 0, err


def _setup(name: Optional[str], tmp: pathlib.Path, data: pathlib.Path,
           trained: Callable[[], pathlib.Path]) -> None:
  if name is None:
    return
  if name == "corrupt_planetoid":
    (tmp / "planetoid").mkdir()
    for f in (data / "planetoid").glob("ind.cora.*"):
      shutil.copy(f, tmp / "planetoid" / f.name)
    graph = tmp / "planetoid" / "ind.cora.graph"
    graph.write_bytes(graph.read_bytes()[:1000])
  elif name in ("truncated_jpeg", "non_image_file"):
    from pdeq_jax.data import images  # pylint: disable=import-outside-toplevel
    images.make_image_folder(tmp / "tree", 2, ["a", "b"], image_size=(4, 4),
                             fmt="jpg" if name == "truncated_jpeg" else "png")
    if name == "truncated_jpeg":
      bad = tmp / "tree" / "train" / "a" / "0001.jpg"
      bad.write_bytes(bad.read_bytes()[:200])
    else:
      (tmp / "tree" / "train" / "b" / "0001.png").write_text("hello")
  elif name in ("trained_run", "corrupt_checkpoint"):
    shutil.copytree(trained(), tmp / "run")
    if name == "corrupt_checkpoint":
      for f in (tmp / "run" / "checkpoints").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
          f.write_bytes(b"\0" * 7)
  elif name == "workdir_file":
    (tmp / "run").write_text("")
  elif name in ("float_run", "untrained_run"):
    from configs import cifar  # pylint: disable=import-outside-toplevel
    run = tmp / "fp_run"
    (run / "checkpoints").mkdir(parents=True)
    config = cifar.get_config("resnet8,cifar10_jpeg,fp")
    (run / "config.json").write_text(config.to_json())
    if name == "float_run":
      (run / "checkpoints" / "1").mkdir()
  else:
    raise ValueError(name)


# ------------------------------------------------------------ running ---

def _fill(argv: List[str], tmp: pathlib.Path, data: pathlib.Path
          ) -> List[str]:
  return [a.format(tmp=tmp, data=data) for a in argv]


def run_program(program: str, argv: List[str]) -> Tuple[int, str]:
  """``python -m <program> <argv>`` in-process: (exit status, stderr)."""
  module = importlib.import_module(PROGRAMS[program])
  fv = flags.FlagValues()
  module.define_flags(fv)
  old = getattr(module, "FLAGS", None)
  module.FLAGS = fv
  err = io.StringIO()
  cwd = os.getcwd()
  os.chdir(REPO_ROOT)
  try:
    status = cli.invoke(module.main, [program, *argv], fv, stderr=err)
  finally:
    module.FLAGS = old
    os.chdir(cwd)
  return status, err.getvalue()


def normalise(text: str, tmp: pathlib.Path, data: pathlib.Path) -> str:
  return (text.replace(str(tmp), "<tmp>").replace(str(data), "<data>")
          .replace(str(REPO_ROOT), "<repo>").strip())


def read_doc_rows() -> Dict[str, Dict[str, str]]:
  """id -> {program, input, message, test} of docs/bad_inputs.md."""
  rows = {}
  for line in DOC.read_text().splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
    if len(cells) != 5 or not re.fullmatch(r"`[a-z0-9_]+`", cells[0]):
      continue
    rows[cells[0].strip("`")] = dict(zip(
        ("program", "input", "message", "test"), cells[1:]))
  return rows


def _doc_message(cell: str) -> str:
  return cell.strip("`").replace("\\|", "|")


@pytest.fixture(scope="module")
def trained_gcn(tmp_path_factory, data_dir):
  path = {}

  def get():
    if "run" not in path:
      tmp = tmp_path_factory.mktemp("trained")
      _trained_run(tmp, data_dir)
      path["run"] = tmp / "run"
    return path["run"]
  return get


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, tmp_path, data_dir, trained_gcn):
  _setup(case.setup, tmp_path, data_dir, trained_gcn)
  status, err = run_program(case.program, _fill(case.argv, tmp_path,
                                                data_dir))
  lines = err.strip().splitlines()
  assert status == 2, err
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  assert "Traceback" not in err
  documented = read_doc_rows()[case.id]
  assert documented["program"] == f"`{case.program}`"
  expected = _doc_message(documented["message"])
  got = normalise(lines[0], tmp_path, data_dir)
  if expected.endswith("..."):
    assert got.startswith(expected[:-3]), got
  else:
    assert got == expected


def test_a_failed_start_leaves_the_workdir_reusable(tmp_path, data_dir):
  """The corrupt-Planetoid run fails before training: the corrected command
  with the same --workdir then trains (issue 23)."""
  _setup("corrupt_planetoid", tmp_path, data_dir, None)
  bad = [a for a in _fill(CASES[[c.id for c in CASES].index(
      "planetoid_truncated_file")].argv, tmp_path, data_dir)]
  assert run_program("train.main", bad + TINY_GCN[:2])[0] == 2
  assert (tmp_path / "run").is_dir()
  good = _fill(GCN + TINY_GCN + ["--config.model.h=0.3"], tmp_path, data_dir)
  status, err = run_program("train.main", good)
  assert status == 0, err
  assert (tmp_path / "run" / "results.json").exists()


def test_verbose_errors_shows_the_traceback(tmp_path, data_dir):
  argv = _fill(GCN + ["--config.model.h=-1", "--verbose_errors"], tmp_path,
               data_dir)
  status, err = run_program("train.main", argv)
  assert status == 2 and "Traceback" in err
  assert err.strip().splitlines()[-1].startswith("error: step size h")


def test_doc_table_lists_every_case():
  rows = read_doc_rows()
  ids = [c.id for c in CASES] + [r[0] for r in OTHER_ROWS]
  assert sorted(rows) == sorted(ids)
  assert len(rows) >= 30
  for case in CASES:
    assert rows[case.id]["test"] == (
        f"`tests/test_bad_inputs.py::test_bad_input[{case.id}]`")
  for row in OTHER_ROWS:
    test_file, test_name = row[4].split("::")
    assert f"def {test_name}(" in (REPO_ROOT / test_file).read_text()


def test_cli_subprocess_one_line_and_status_2(tmp_path):
  """The real entry point (``python -m train.main``), once."""
  import subprocess  # pylint: disable=import-outside-toplevel
  proc = subprocess.run(
      [sys.executable, "-m", "train.main",
       "--config=configs/pde_gcn.py:cora,sym,4w4a", "--config.nope=1",
       f"--workdir={tmp_path}/run"], cwd=REPO_ROOT,
      env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
      text=True, timeout=300)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      "error: unknown config key (config.nope = 1; keys of config: "
      "checkpoint_every, data, model, noise, num_epochs, optim, patience, "
      "quant, seed, task)"]
  assert not (tmp_path / "run").exists()


# ------------------------------------------------------------ the doc ---

def _escape(text: str) -> str:
  return text.replace("|", "\\|")


def render_doc(data: pathlib.Path) -> str:
  """docs/bad_inputs.md from running every case (see the module docstring)."""
  import tempfile  # pylint: disable=import-outside-toplevel
  out = [DOC_HEADER]
  trained: Dict[str, pathlib.Path] = {}
  keep = tempfile.mkdtemp()

  def get():
    if "run" not in trained:
      base = pathlib.Path(keep)
      _trained_run(base, data)
      trained["run"] = base / "run"
    return trained["run"]

  for case in CASES:
    with tempfile.TemporaryDirectory() as tmp:
      tmp = pathlib.Path(tmp)
      _setup(case.setup, tmp, data, get)
      status, err = run_program(case.program, _fill(case.argv, tmp, data))
      assert status == 2, (case.id, err)
      message = normalise(err.strip().splitlines()[-1], tmp, data)
      if case.id == "corrupt_checkpoint":  # Orbax's own text follows
        message = message[:message.index("(") + 1] + "..."
      shown = " ".join(a if " " not in a else repr(a) for a in case.argv)
      out.append(f"| `{case.id}` | `{case.program}` | `{_escape(shown)}` | "
                 f"`{_escape(message)}` | "
                 f"`tests/test_bad_inputs.py::test_bad_input[{case.id}]` |")
  for id_, program, text, message, test in OTHER_ROWS:
    out.append(f"| `{id_}` | `{program}` | {_escape(text)} | "
               f"`{_escape(message)}` | `{test}` |")
  shutil.rmtree(keep, ignore_errors=True)
  return "\n".join(out) + "\n"


DOC_HEADER = """# Bad inputs and what the programs print

Every program (`python -m train.main`, `train.sweep`, `train.reproduce`,
`train.consistency_report`, `train.fig2_tv`) validates its flags and config
before writing anything (`train/validate.py`, one validator per config
family) and ends on any error with **one line** on stderr,
`error: <what> (<field> = <value>; <what is allowed>)` for config values, and
**exit status 2** (1 for a run that diverged).  `--verbose_errors` adds the
traceback.

In the inputs, `{tmp}` is a scratch directory and `{data}` the data
directory; in the messages they read `<tmp>` and `<data>`.  A message ending
in `...` is shown up to there (the rest is the underlying library's text).
Each row is checked by the test named in its last column: the test runs the
input and compares the printed line with this table
(`python -m tests.test_bad_inputs > docs/bad_inputs.md` regenerates it).

Workdirs: a run claims its `--workdir` at its first checkpoint.  A run that
failed before (bad data, bad flags) leaves it reusable by the corrected
command (`test_a_failed_start_leaves_the_workdir_reusable`); a workdir with
checkpoints and another config is refused with the differing keys
(`workdir_other_config` below).  NaN/Inf: the trainers check the loss and
metrics every epoch (GCN) or every `log_every_steps` steps and at each
checkpoint (image trainers), stop naming the step, keep the last good
checkpoint and write no `results.json` (`tests/test_nan_stop.py`).

| case | program | input | message printed | test |
|---|---|---|---|---|"""


if __name__ == "__main__":
  import contextlib  # pylint: disable=ungrouped-imports
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  with contextlib.redirect_stdout(sys.stderr):  # the programs' own output
    text = render_doc(pathlib.Path(os.environ.get(
        "PDEQ_DATA_DIR", REPO_ROOT.parent / "shared" / "data")))
  sys.stdout.write(text)


@pytest.mark.parametrize("start,per_step,target", [
    (16, 10, 4), (8, 1, 4), (5, 2, 4), (6, 3, 2), (4, 5, 8)])
def test_gradual_schedule_check_agrees_with_the_schedule(start, per_step,
                                                         target):
  """A config passes iff the trainers' own schedule is at the target bits in
  the last epoch (issue 15, Part 3 item 6), at and around the boundary."""
  from configs import pde_gcn  # pylint: disable=import-outside-toplevel
  from train import common, validate  # pylint: disable=import-outside-toplevel
  config = pde_gcn.get_config("cora,sym,4w4a")
  config.quant.update(gradual=True, start_bits=start,
                      epochs_per_step=per_step, act_bits=target)
  outcomes = []
  for epochs in range(1, max(start - target, 0) * per_step + 4):
    config.num_epochs = epochs
    last = int(common.bits_for_epoch(config, epochs - 1).activations)
    try:
      validate.quant_section(config)
      accepted = True
    except validate.ConfigError as e:
      assert e.field == "config.num_epochs"
      accepted = False
    assert accepted == (last == target), (epochs, last)
    outcomes.append(accepted)
  assert outcomes[-1] and (outcomes[0] == (start <= target))


@pytest.mark.parametrize("path,arg", [
    ("pde_gcn", "cora,sym,4w4a"), ("pde_gcn", "citeseer,nonsym,fp"),
    ("pde_gcn", "pubmed,sym,4w8a"), ("cifar", "resnet56,cifar10,4w4a"),
    ("cifar", "resnet20,cifar10_jpeg,2w2a,cpu"),
    ("cifar", "stable_resnet20,imagefolder:/data/x,4w8a,cpu"),
    ("deeplab", "synthetic,5w5a,cpu"), ("deeplab", "cityscapes,5w5a,tv"),
    ("tv_pipeline", "resnet20,cifar100,4w4a"),
    ("tv_pipeline", "resnet20,cifar10_jpeg,4w8a,cpu"),
    ("tv_pipeline", "resnet20,cifar10_jpeg,2w2a,cpu"),
    ("tv_pipeline", "deeplabv3_resnet50,cityscapes,5w5a")])
def test_shipped_configs_validate(path, arg):
  from train import validate  # pylint: disable=import-outside-toplevel
  config = importlib.import_module(f"configs.{path}").get_config(arg)
  validate.config(config)
