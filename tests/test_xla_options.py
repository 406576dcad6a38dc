"""The per-computation CPU compiler options: when they apply, that they take
effect, and that they change no numbers (gradients of a quantized ResNet step
equal the step compiled with XLA's defaults)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pdeq_jax import layers
from pdeq_jax import models
from pdeq_jax import xla_options


def _ynn_convolutions(hlo_text: str) -> int:
  """Convolutions inside YNNPACK fusions of an optimised HLO module."""
  ynn_computations = set(re.findall(
      r"calls=%([\w.\-]+), backend_config=\{\"fusion_config\":\{\"kind\":"
      r"\"__ynn_fusion\"", hlo_text))
  count = 0
  for name in ynn_computations:
    body = re.search(r"^%" + re.escape(name) + r" .*?^}", hlo_text,
                     re.S | re.M)
    count += body is not None and "convolution(" in body.group(0)
  return count


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
  monkeypatch.delenv(xla_options.DISABLE_ENV, raising=False)
  monkeypatch.setenv("XLA_FLAGS", "")


def test_options_only_on_cpu():
  assert xla_options.compiler_options("gpu") == {}
  assert xla_options.compiler_options("tpu") == {}
  assert xla_options.compiler_options("cpu") == xla_options.CPU_TRAINING_OPTIONS
  assert xla_options.compiler_options("cpu", workload="graph") == \
      xla_options.CPU_GRAPH_OPTIONS
  with pytest.raises(ValueError, match="workload"):
    xla_options.compiler_options("cpu", workload="transformer")


def test_env_and_user_flags_win(monkeypatch):
  monkeypatch.setenv(xla_options.DISABLE_ENV, "0")
  assert xla_options.compiler_options("cpu") == {}
  monkeypatch.setenv(xla_options.DISABLE_ENV, "1")
  monkeypatch.setenv("XLA_FLAGS",
                     f"--{xla_options.YNN_FUSION_FLAG}=LIBRARY_FUSION_TYPE_DOT")
  assert xla_options.compiler_options("cpu") == {}


def test_unknown_option_falls_back_with_a_warning(monkeypatch):
  monkeypatch.setattr(xla_options, "CPU_TRAINING_OPTIONS",
                      {xla_options.YNN_FUSION_FLAG: "NOT_A_FUSION_TYPE"})
  with pytest.warns(UserWarning, match="rejects"):
    assert xla_options.compiler_options("cpu") == {}


def test_jit_refuses_its_own_option():
  with pytest.raises(TypeError, match="compiler_options"):
    xla_options.jit(lambda x: x, compiler_options={})


def _train_step(model):
  tx = optax.sgd(0.1, momentum=0.9)

  def step(params, batch_stats, x, y, bits):
    def loss_fn(p):
      logits, new_state = model.apply({"params": p, "batch_stats": batch_stats},
                                      x, bits, train=True,
                                      mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, y).mean(), new_state
    (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params)
    updates, _ = tx.update(grads, tx.init(params), params)
    return loss, grads, optax.apply_updates(params, updates), new_state
  return step


@pytest.mark.parametrize("name", ["resnet8", "stable_resnet8"])
def test_gradients_equal_xla_defaults(name):
  if jax.default_backend() != "cpu":
    pytest.skip("CPU options")
  model = models.create(name, 10)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((16, 32, 32, 3), np.float32))
  y = jnp.asarray(rng.integers(0, 10, 16).astype(np.int32))
  variables = model.init(jax.random.PRNGKey(0), x[:1], layers.FLOAT_BITS)
  bits = layers.QuantBits.make(4, 4)
  step = _train_step(model)
  args = (variables["params"], variables["batch_stats"], x, y, bits)

  library = xla_options.jit(step).lower(*args).compile()
  default = jax.jit(step).lower(*args).compile()
  assert _ynn_convolutions(library.as_text()) == 0
  out_library, out_default = library(*args), default(*args)
  # Eager (op by op) as a third opinion.
  with jax.disable_jit():
    out_eager = step(*args)
  for reference in (out_default, out_eager):
    for a, b in zip(jax.tree_util.tree_leaves(out_library),
                    jax.tree_util.tree_leaves(reference)):
      scale = float(jnp.max(jnp.abs(b))) + 1e-6
      np.testing.assert_allclose(np.asarray(a) / scale, np.asarray(b) / scale,
                                 atol=2e-5)


_FAULTS_SCRIPT = """
import ctypes, ctypes.util, resource, threading
from pdeq_jax import xla_options
applied = xla_options.keep_freed_host_memory()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
faults = []
def steps():  # as XLA's executor: one large block per step, on a thread
  for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(64 * 2 ** 20)
    ctypes.memset(block, 1, 64 * 2 ** 20)
    libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
t = threading.Thread(target=steps)
t.start(); t.join()
print(applied, min(faults[1:]))
"""


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"),
                    reason="glibc only")
@pytest.mark.parametrize("env, applied",
                         [("1", True), ("0", False), (None, False)])
def test_keep_freed_host_memory_stops_refaulting(env, applied):
  """A 64 MiB block freed and allocated again on a thread: 16,384 pages
  faulted in per allocation by default (glibc unmaps it), ~none when kept
  (opt-in: PDEQ_JAX_KEEP_HOST_MEMORY=1)."""
  import os  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  environ = {k: v for k, v in os.environ.items()
             if k != xla_options.KEEP_MEMORY_ENV}
  if env is not None:
    environ[xla_options.KEEP_MEMORY_ENV] = env
  proc = subprocess.run(
      [sys.executable, "-c", _FAULTS_SCRIPT], capture_output=True, text=True,
      env=environ, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  got_applied, faults = proc.stdout.split()
  assert got_applied == str(applied)
  if applied:
    assert int(faults) < 1000, faults
  else:
    assert int(faults) >= 16384, faults
