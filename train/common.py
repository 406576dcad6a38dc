"""Machinery shared by every trainer: workdir, metrics, checkpoints, progress.

Every run writes into its ``--workdir``:

* ``config.json``: the resolved config (a resumed run must match it);
* ``metrics.jsonl``: one JSON object per logged step/epoch;
* ``checkpoints/``: Orbax checkpoints (the latest ``keep`` ones plus ``best``);
* result tables (``*.md``) and plots (``*.png``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import sys
import time
from typing import Any, Dict, Iterable, Mapping, Optional

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from pdeq_jax import layers
from pdeq_jax import quant
from train import launch

FLOAT_BITS = 32  # a config bit width of 32 means "no quantizer at all"


def quiet_absl_logging() -> None:
  """WARNING level for absl (Orbax logs every save at INFO) unless the user
  passed --verbosity."""
  from absl import flags, logging  # pylint: disable=import-outside-toplevel
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


# Environment variables set by ``train.launch`` for each local process.
ENV_COORDINATOR = launch.ENV_COORDINATOR
ENV_NUM_PROCESSES = launch.ENV_NUM_PROCESSES
ENV_PROCESS_ID = launch.ENV_PROCESS_ID


def initialize_distributed() -> None:
  """``jax.distributed.initialize()`` for ``config.distributed``.

  Under ``train.launch`` the coordinator address, process count and index
  come from its ``PDEQ_*`` environment variables; elsewhere (SLURM, Cloud
  TPU, Open MPI) JAX detects them.  On CPU the collectives across processes
  go through gloo.
  """
  # only the CPU backend uses it (GPU: NCCL, TPU: ICI/DCN)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if ENV_COORDINATOR in os.environ:
    jax.distributed.initialize(
        coordinator_address=os.environ[ENV_COORDINATOR],
        num_processes=int(os.environ[ENV_NUM_PROCESSES]),
        process_id=int(os.environ[ENV_PROCESS_ID]))
  else:
    jax.distributed.initialize()


def is_primary() -> bool:
  """Whether this process writes the run's files (metrics, plots, results):
  process 0 of a multi-process run; always true in a single process (then
  without starting a JAX backend)."""
  return not jax.distributed.is_initialized() or jax.process_index() == 0


def config_to_dict(config: Any) -> Dict[str, Any]:
  if isinstance(config, ml_collections.ConfigDict):
    return config.to_dict()
  return dict(config)


def _jsonable(value: Any) -> Any:
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, (np.generic, np.ndarray)) or hasattr(value, "__array__"):
    arr = np.asarray(value)
    return arr.item() if arr.ndim == 0 else arr.tolist()
  return value


def write_text(path: os.PathLike, text: str) -> None:
  """Writes ``text`` atomically: a temporary file in the same directory, then
  ``os.replace``; a kill leaves either the old file or the new one, never a
  half-written one.  In a multi-process run only process 0 writes
  (:func:`is_primary`); the others skip it."""
  if not is_primary():
    return
  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  try:
    with open(tmp, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()


def write_json(path: os.PathLike, obj: Any) -> None:
  """``obj`` as JSON, written atomically (:func:`write_text`)."""
  write_text(path, json.dumps(_jsonable(obj), indent=2, sort_keys=True))


def workdir_claimed(workdir: os.PathLike) -> bool:
  """Whether a run has started training in ``workdir``: it holds a checkpoint
  (of its own or of a pipeline stage) or a finished run's results.  A run that
  failed before its first checkpoint claims nothing."""
  workdir = pathlib.Path(workdir)
  if (workdir / "results.json").exists():
    return True
  return any(any(d.iterdir()) for d in
             (*workdir.glob("checkpoints"), *workdir.glob("*/checkpoints"))
             if d.is_dir())


def prepare_workdir(workdir: os.PathLike, config: Any,
                    resume_keys_ignored: Iterable[str] = ("num_epochs",)
                    ) -> pathlib.Path:
  """Creates ``workdir`` and records the config; refuses a mismatched resume.

  A workdir whose run has started training (:func:`workdir_claimed`) and
  holds a different config (apart from the keys in ``resume_keys_ignored``,
  e.g. extending the number of epochs) raises ValueError naming the differing
  keys, so that a resumed run can never silently mix two experiments.  The
  ``config.json`` of a run that failed before training is simply replaced.

  Keys that the recorded config does not have at all were added to pdeq-jax
  after the run started (new options default to the old behaviour), so a run
  recorded by an older version still resumes: those keys are printed with the
  values they take, and ``config.json`` is updated.
  """
  workdir = pathlib.Path(workdir)
  if workdir.exists() and not workdir.is_dir():
    raise NotADirectoryError(f"--workdir {workdir} is a file, not a "
                             "directory")
  workdir.mkdir(parents=True, exist_ok=True)
  new = _jsonable(config_to_dict(config))
  path = workdir / "config.json"
  if path.exists() and workdir_claimed(workdir):
    try:
      old = json.loads(path.read_text())
    except ValueError:
      raise ValueError(f"{path} is corrupt (not JSON); delete the workdir "
                       f"{workdir} to start fresh, or use a new --workdir"
                       ) from None
    added = sorted(_added_keys(old, new))
    diffs = sorted(_diff_keys(old, new) - set(resume_keys_ignored)
                   - set(added))
    if added and not diffs:
      print(f"resuming {workdir}, recorded by an older pdeq-jax: keys it did "
            "not have take the values "
            + ", ".join(f"{k}={_lookup(new, k)!r}" for k in added),
            flush=True)
    if diffs:
      raise ValueError(
          f"workdir {workdir} holds a run with a different config "
          f"(keys {diffs}); use a new --workdir or restore the config")
  write_json(path, new)
  return workdir


def _added_keys(old: Any, new: Any, prefix: str = "") -> set:
  """Dotted keys present in ``new`` whose path is absent from ``old``."""
  if not (isinstance(old, dict) and isinstance(new, dict)):
    return set()
  out = set()
  for k, v in new.items():
    if k not in old:
      out.add(f"{prefix}{k}")
    else:
      out |= _added_keys(old[k], v, f"{prefix}{k}.")
  return out


def _lookup(tree: Dict[str, Any], dotted: str) -> Any:
  for part in dotted.split("."):
    tree = tree[part]
  return tree


def _diff_keys(a: Any, b: Any, prefix: str = "") -> set:
  if isinstance(a, dict) and isinstance(b, dict):
    out = set()
    for k in set(a) | set(b):
      out |= _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
    return out
  return set() if a == b else {prefix.rstrip(".")}


class MetricWriter:
  """Appends JSON lines to ``metrics.jsonl``; on resume drops stale lines.

  Lines logged after the checkpoint a run resumes from would be duplicated by
  the resumed run, so ``truncate_after(step)`` removes them first.  Every
  line also goes to TensorBoard (:class:`TensorBoardWriter`, same directory).
  In a multi-process run only process 0 writes (the others' ``write`` and
  ``truncate_after`` do nothing).
  """

  def __init__(self, workdir: os.PathLike, filename: str = "metrics.jsonl",
               tensorboard: bool = True):
    self.path = pathlib.Path(workdir) / filename
    self.primary = is_primary()
    self.tensorboard = (TensorBoardWriter(workdir)
                        if tensorboard and self.primary else None)

  def truncate_after(self, step: int, key: str = "step") -> None:
    if not self.primary or not self.path.exists():
      return
    kept = [line for line in self.path.read_text().splitlines()
            if _parse_line(line).get(key, math.inf) <= step]
    write_text(self.path, "".join(line + "\n" for line in kept))
    if self.tensorboard is not None:
      self.tensorboard.purge_after(step)

  def write(self, **metrics: Any) -> None:
    if not self.primary:
      return
    with self.path.open("a") as f:
      f.write(json.dumps(_jsonable(metrics), sort_keys=True) + "\n")
    if self.tensorboard is not None:
      self.tensorboard.write(metrics)

  def close(self) -> None:
    if self.tensorboard is not None:
      self.tensorboard.close()

  def read(self) -> list:
    if not self.path.exists():
      return []
    rows = [_parse_line(line) for line in self.path.read_text().splitlines()]
    return [row for row in rows if row]


def _parse_line(line: str) -> Dict[str, Any]:
  """One metrics line; {} for a blank line or one cut short by a kill."""
  try:
    row = json.loads(line) if line.strip() else {}
  except ValueError:
    return {}
  return row if isinstance(row, dict) else {}


class CorruptCheckpointError(RuntimeError):
  """A checkpoint that cannot be read back (truncated, corrupt, mismatched)."""

  def __init__(self, directory: os.PathLike, step: int, cause: BaseException):
    cause_text = " ".join(f"{type(cause).__name__}: {cause}".split())[:300]
    workdir = pathlib.Path(directory).parent
    super().__init__(
        f"checkpoint {pathlib.Path(directory) / str(step)} cannot be restored "
        f"({cause_text}); to start fresh delete {directory} (or the whole "
        f"workdir {workdir}), or use a new --workdir")


class NonFiniteError(RuntimeError):
  """Training produced a NaN or Inf; the last good checkpoint is kept."""


def check_finite(values: Mapping[str, Any], where: str,
                 last_good: Optional[str] = None,
                 on_error: Optional[Any] = None) -> None:
  """Raises :class:`NonFiniteError` naming ``where`` (e.g. "epoch 7"), the
  first entry of ``values`` (scalars, arrays or pytrees of them, e.g. the
  parameters) holding a NaN/Inf, and that value; ``on_error()`` runs first
  (e.g. finishing the pending checkpoint writes)."""
  for key, value in values.items():
    for leaf in jax.tree_util.tree_leaves(value):
      flat = np.ravel(np.asarray(leaf))
      if not np.issubdtype(flat.dtype, np.number):
        continue
      bad = flat[~np.isfinite(flat)]
      if bad.size:
        if on_error is not None:
          on_error()
        keep = (f"; the last good checkpoint ({last_good}) is kept"
                if last_good else "; no checkpoint was written")
        raise NonFiniteError(
            f"training diverged: {key} = {bad[0].item()} at {where}{keep}; no "
            "results.json written (lower the learning rate or check the "
            "inputs)")


def tree_is_finite(tree: Any) -> bool:
  """Whether every floating-point leaf of ``tree`` is finite (host check)."""
  for leaf in jax.tree_util.tree_leaves(tree):
    arr = np.asarray(leaf)
    if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
      return False
  return True


def check_runtime_bits(bits: Any) -> None:
  """Bits entering a trainer's step: each in [2, 32] (32 = clip only).

  Bits are traced inside the jitted steps, where a value below 2 turns the
  quantizer's grid into NaN; they are checked here, on the host, where they
  enter the trainers.
  """
  for name, value in zip(("weights", "activations"), bits):
    if value is None:
      continue
    v = int(np.asarray(value))
    if not quant.MIN_BITS <= v <= quant.MAX_BITS:
      raise ValueError(f"runtime bit width out of range (bits.{name} = {v}; "
                       f"allowed: [{quant.MIN_BITS}, {quant.MAX_BITS}], "
                       f"{quant.CLIP_ONLY_BITS} = clip only)")


@contextlib.contextmanager
def _orbax_quiet():
  """Orbax logs ERROR lines of its own for a corrupt checkpoint; the
  :class:`CorruptCheckpointError` says it in one line (shown with
  --verbosity=1)."""
  from absl import logging  # pylint: disable=import-outside-toplevel
  verbosity = logging.get_verbosity()
  if verbosity < logging.DEBUG:
    logging.set_verbosity(logging.FATAL)
  try:
    yield
  finally:
    logging.set_verbosity(verbosity)


class TensorBoardWriter:
  """Scalar summaries for TensorBoard (``tensorboard --logdir workdirs/``).

  ``write(metrics)`` logs every numeric value of a metrics line at its
  ``step`` (else its ``epoch``), through ``tensorboardX`` (no TensorFlow).
  The event file is opened at the first write; after ``purge_after(step)``
  (a resumed run) it starts with a purge marker, so TensorBoard drops the
  earlier run's events past ``step``.
  """

  def __init__(self, logdir: os.PathLike, flush_secs: int = 10):
    self.logdir = pathlib.Path(logdir)
    self.flush_secs = flush_secs
    self._writer = None
    self._purge_step = None

  def purge_after(self, step: int) -> None:
    if self._writer is None:
      self._purge_step = int(step) + 1

  def write(self, metrics: Mapping[str, Any]) -> None:
    step_key = "step" if "step" in metrics else "epoch"
    step = int(metrics[step_key])
    if self._writer is None:
      # the suffix orders (and keeps apart) files opened in the same second
      self._writer = _summary_writer_class()(
          str(self.logdir), purge_step=self._purge_step,
          flush_secs=self.flush_secs, filename_suffix=f".{time.time_ns()}")
    for key, value in metrics.items():
      if key == step_key or isinstance(value, (str, bool)):
        continue
      value = np.asarray(value)
      # -inf (no best model yet, e.g. before the gradual schedule reaches
      # the target bits) has no place on a curve: it stays in the JSONL only
      if (value.ndim == 0 and np.issubdtype(value.dtype, np.number)
          and np.isfinite(value)):
        self._writer.add_scalar(key, float(value), step)

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None


def quantizer_stats(params: Any) -> Dict[str, float]:
  """Mean, min and max of the learned clipping scales (activation and weight
  quantizers' alpha apart) and of the TV steps gamma, for the logs."""
  groups: Dict[str, list] = {"alpha_act": [], "alpha_weight": [],
                             "tv_gamma": []}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = [str(getattr(k, "key", k)) for k in path]
    name, parent = names[-1], (names[-2] if len(names) > 1 else "")
    if name.startswith("alpha"):
      group = ("alpha_weight" if parent.startswith(("wq", "WeightQuant"))
               else "alpha_act")
      groups[group].append(np.ravel(layers.positive_alpha(leaf)))
    elif name == "rho":  # TVActivation: gamma = gamma_max * sigmoid(rho)
      groups["tv_gamma"].append(np.ravel(
          layers.TVActivation.gamma_max * jax.nn.sigmoid(leaf)))
  stats = {}
  for group, values in groups.items():
    if values:
      values = np.concatenate(jax.device_get(values))
      stats.update({f"{group}_mean": float(values.mean()),
                    f"{group}_min": float(values.min()),
                    f"{group}_max": float(values.max())})
  return stats


def _summary_writer_class():
  """``tensorboardX.SummaryWriter``, imported without torch.

  tensorboardX imports torch when it can (only to accept torch tensors,
  which pdeq-jax never passes); that costs seconds and memory in every
  trainer, so torch is hidden while tensorboardX is imported, unless the
  process already imported it.
  """
  hide = "torch" not in sys.modules
  if hide:
    sys.modules["torch"] = None  # `import torch` raises ImportError
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
  finally:
    if hide:
      del sys.modules["torch"]
  return SummaryWriter


class Checkpointer:
  """Orbax checkpoints of an arbitrary pytree (state + trainer bookkeeping)."""

  def __init__(self, directory: os.PathLike, keep: int = 2):
    self.directory = pathlib.Path(directory).absolute()
    with _orbax_quiet():
      self.manager = ocp.CheckpointManager(
          self.directory,
          options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
          item_handlers=ocp.StandardCheckpointHandler())  # (for metadata)

  def latest_step(self) -> Optional[int]:
    with _orbax_quiet():
      return self.manager.latest_step()

  def save(self, step: int, tree: Any, *, force: bool = False) -> None:
    self.manager.save(step, args=ocp.args.StandardSave(tree), force=force)

  def restore(self, target: Any, step: Optional[int] = None) -> Any:
    step = self.manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint under {self.directory}")
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
    return self._restore(step, ocp.args.StandardRestore(abstract))

  def metadata(self, step: Optional[int] = None) -> Any:
    """The saved tree's structure (nested dicts of array metadata with
    ``shape`` and ``dtype``), without reading the arrays."""
    step = self.manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint under {self.directory}")
    with _orbax_quiet():
      return self.manager.item_metadata(step).tree

  def restore_raw(self, step: Optional[int] = None) -> Any:
    """The saved tree as nested dicts of arrays, without a target."""
    step = self.manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint under {self.directory}")
    return self._restore(step, ocp.args.StandardRestore())

  def _restore(self, step: int, args: Any) -> Any:
    with _orbax_quiet():
      try:
        return self.manager.restore(step, args=args)
      except Exception as e:  # pylint: disable=broad-except
        raise CorruptCheckpointError(self.directory, step, e) from e

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


class Progress:
  """Prints rate and ETA every ``every_s`` seconds (and on the last step)."""

  def __init__(self, total: int, start: int = 0, unit: str = "step",
               every_s: float = 5.0, stream=None, enabled: bool = True):
    self.total, self.start, self.unit = total, start, unit
    self.every_s = every_s
    self.stream = stream or sys.stdout
    self.enabled = enabled
    self.t0 = time.perf_counter()
    self.last_print = -math.inf

  def rate(self, done: int) -> float:
    elapsed = time.perf_counter() - self.t0
    return (done - self.start) / elapsed if elapsed > 0 else 0.0

  def update(self, done: int, extra: str = "", items_per_unit: int = 0,
             item_name: str = "items") -> None:
    now = time.perf_counter()
    if not self.enabled:
      return
    if now - self.last_print < self.every_s and done < self.total:
      return
    self.last_print = now
    rate = self.rate(done)
    eta = (self.total - done) / rate if rate > 0 else float("inf")
    items = (f" {rate * items_per_unit:,.0f} {item_name}/s"
             if items_per_unit else "")
    print(f"[{done}/{self.total} {self.unit}s] {rate:.2f} {self.unit}s/s"
          f"{items} ETA {format_seconds(eta)} {extra}", file=self.stream,
          flush=True)


def format_seconds(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"


def markdown_table(header: list, rows: list) -> str:
  """A GitHub markdown table from a header and rows of cells."""
  lines = ["| " + " | ".join(str(h) for h in header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines) + "\n"


# ------------------------------------------------- quantization in configs ---

def _bits_or_none(bits: int):
  return None if bits == FLOAT_BITS else bits


def target_bits(config: ml_collections.ConfigDict) -> layers.QuantBits:
  """The configured bits as runtime values (32 -> clip only)."""
  return layers.QuantBits.make(_bits_or_none(config.quant.weight_bits),
                               _bits_or_none(config.quant.act_bits))


def at_target_bits(config: ml_collections.ConfigDict,
                   bits: layers.QuantBits) -> bool:
  """Whether an epoch's runtime ``bits`` are the configured targets (model
  selection only considers such epochs: the gradual schedule's earlier
  epochs train a different, higher-precision model)."""
  return all(int(a) == int(b) for a, b in zip(bits, target_bits(config)))


def bits_for_epoch(config: ml_collections.ConfigDict,
                   epoch: int) -> layers.QuantBits:
  """Runtime bits of an epoch: the gradual schedule (Sec. 5.3) when
  ``config.quant.gradual``, else the targets; 32 -> clip only."""
  q = config.quant
  if not q.gradual:
    return target_bits(config)
  scheduled = lambda target: quant.bit_schedule(
      epoch, _bits_or_none(target), start_bits=q.start_bits,
      epochs_per_step=q.epochs_per_step)
  return layers.QuantBits.make(scheduled(q.weight_bits),
                               scheduled(q.act_bits))


def run_or_load(trainer, config, run_dir: pathlib.Path,
                report_only: bool = False, verbose: bool = False,
                **train_kwargs) -> Optional[Dict[str, Any]]:
  """A finished run's results, else trains it (None: not run, report only).

  Cached results are only reused when the run's recorded ``config.json``
  equals ``config``; otherwise ValueError names the differing keys.  The wall
  time of a fresh run is added as ``wall_seconds``.  ``train_kwargs`` go to
  ``trainer.train_and_evaluate`` (e.g. the sweep's ``epoch_callback``); a
  run stopped by that callback (``stopped_by_callback_at_epoch``) has not
  finished, so nothing is cached for it.
  """
  results_file = run_dir / "results.json"
  if results_file.exists():
    _check_cached_config(run_dir, config)
    return json.loads(results_file.read_text())
  if report_only:
    return None
  t0 = time.perf_counter()
  results = trainer.train_and_evaluate(config, str(run_dir), verbose=verbose,
                                       **train_kwargs)
  if "stopped_by_callback_at_epoch" in results:
    return results
  results["wall_seconds"] = time.perf_counter() - t0
  write_json(results_file, results)
  return results


def _check_cached_config(run_dir: pathlib.Path, config: Any) -> None:
  """Raises ValueError unless ``run_dir/config.json`` is ``config``."""
  path = run_dir / "config.json"
  if not path.exists():
    raise ValueError(f"{run_dir / 'results.json'} has no config.json beside "
                     f"it, so the config that produced it is unknown; delete "
                     f"{run_dir} to retrain")
  diffs = sorted(_diff_keys(json.loads(path.read_text()),
                            _jsonable(config_to_dict(config))))
  if diffs:
    raise ValueError(f"{run_dir / 'results.json'} was produced by a different "
                     f"config (keys {diffs}); delete {run_dir} to retrain, or "
                     f"restore the config")
