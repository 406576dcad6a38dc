"""Per-computation XLA compiler options that make CNN training fast on CPU.

What was measured (``benchmarks/README.md``, "Where the CPU time goes"):
jaxlib 0.10's XLA:CPU hands every convolution to YNNPACK by default
(``__ynn_fusion`` custom fusions).  On the 2-core development machine YNNPACK
ran the convolutions of a CIFAR ResNet slower than XLA's Eigen path: forward
and input-gradient 1.3-1.6x slower, and the weight gradients (a convolution
whose window is the whole feature map and whose output is 3x3) 2-3x slower.
Keeping YNNPACK for reductions only (BatchNorm statistics, where it is ~5x
faster than XLA's own tree reduction) and running convolutions and dots on
Eigen made the ResNet-56 training step 1.49x faster (1.33-1.60x over the
benchmarked nets and precisions): the same computation on other kernels,
equal to float32 rounding (``tests/test_xla_options.py``).

The options are passed per computation (``jax.jit(..., compiler_options=)``),
not through ``XLA_FLAGS``: nothing global is changed, the GPU/TPU lowering is
untouched (no options off CPU), and a user's own ``XLA_FLAGS`` setting of the
same flag wins.  A jaxlib that does not know the option gets none (with a
warning), so the library keeps working when XLA renames it.

Set ``PDEQ_JAX_CPU_OPTIONS=0`` to compile with XLA's defaults (e.g. to compare).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
import warnings
from typing import Any, Callable, Dict, Optional

import jax
import jax.numpy as jnp

YNN_FUSION_FLAG = "xla_cpu_experimental_ynn_fusion_type"
# CNNs: YNNPACK for reductions only; convolutions and dots go to Eigen.
CPU_TRAINING_OPTIONS: Dict[str, Any] = {
    YNN_FUSION_FLAG: "LIBRARY_FUSION_TYPE_REDUCE"}
# Graph networks (many small gathers, scatters, [E, C] matmuls and scalar
# reductions per layer): no YNNPACK at all; its per-call cost exceeded the
# work of the small reductions (PDE-GCN on Cora, see benchmarks/README.md).
CPU_GRAPH_OPTIONS: Dict[str, Any] = {YNN_FUSION_FLAG: ""}
PRESETS = {"cnn": "CPU_TRAINING_OPTIONS", "graph": "CPU_GRAPH_OPTIONS"}
DISABLE_ENV = "PDEQ_JAX_CPU_OPTIONS"
KEEP_MEMORY_ENV = "PDEQ_JAX_KEEP_HOST_MEMORY"
# glibc <malloc.h> mallopt parameters
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8


def _user_overrides(flag: str) -> bool:
  return flag in os.environ.get("XLA_FLAGS", "")


@functools.lru_cache(maxsize=None)
def _options_accepted(items: tuple) -> bool:
  """Whether this jaxlib compiles a small convolution with these options."""
  options = dict(items)
  x = jnp.zeros((1, 4, 4, 2), jnp.float32)
  k = jnp.zeros((3, 3, 2, 2), jnp.float32)
  conv = lambda a, b: jax.lax.conv_general_dilated(
      a, b, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  try:
    jax.jit(conv, compiler_options=options).lower(x, k).compile()
  except Exception as e:  # pylint: disable=broad-except
    warnings.warn(f"pdeq_jax.xla_options: this jaxlib rejects {options} "
                  f"({str(e).splitlines()[0][:160]}); compiling with XLA's "
                  f"defaults, CPU training may be slower")
    return False
  return True


def compiler_options(platform: Optional[str] = None,
                     workload: str = "cnn") -> Dict[str, Any]:
  """The compiler options for a training/evaluation step on ``platform``.

  Args:
    platform: ``'cpu'``, ``'gpu'``, ``'tpu'``...; default: JAX's default
      backend.
    workload: ``'cnn'`` (:data:`CPU_TRAINING_OPTIONS`) or ``'graph'``
      (:data:`CPU_GRAPH_OPTIONS`).

  Returns:
    The preset on CPU (unless disabled through ``PDEQ_JAX_CPU_OPTIONS=0``,
    overridden by the same flag in ``XLA_FLAGS``, or unknown to this jaxlib),
    else ``{}``.
  """
  if workload not in PRESETS:
    raise ValueError(f"workload must be one of {sorted(PRESETS)}, got "
                     f"{workload!r}")
  platform = jax.default_backend() if platform is None else platform
  if platform != "cpu" or os.environ.get(DISABLE_ENV, "1") == "0":
    return {}
  preset = globals()[PRESETS[workload]]
  options = {k: v for k, v in preset.items() if not _user_overrides(k)}
  if options and not _options_accepted(tuple(sorted(options.items()))):
    return {}
  return options


def jit(fun: Callable, *, workload: str = "cnn", **kwargs) -> Callable:
  """``jax.jit`` with :func:`compiler_options` of the default backend."""
  if "compiler_options" in kwargs:
    raise TypeError("pdeq_jax.xla_options.jit sets compiler_options itself; "
                    "use jax.jit to pass your own")
  return jax.jit(fun, compiler_options=compiler_options(workload=workload),
                 **kwargs)


def keep_freed_host_memory() -> bool:
  """Lets glibc reuse the freed buffers of a step instead of unmapping them.

  XLA:CPU allocates a training step's temporaries (329 MiB for ResNet-20 at
  batch 128, 1.45 GiB for ResNet-56) as one block on an executor thread.
  glibc serves a block that large with a fresh ``mmap`` from the thread's
  arena and unmaps it when the step frees it, so every step page-faults the
  whole block in again (84,000 minor faults and ~0.16 CPU-s of kernel time
  per ResNet-20 step).  This sets, process-wide, one malloc arena
  (``M_ARENA_MAX=1``: thread arenas always fall back to ``mmap`` for such
  blocks), no ``mmap`` for large blocks (``M_MMAP_MAX=0``) and no trimming
  of the heap top (``M_TRIM_THRESHOLD`` 2 GiB - 1, ``M_TOP_PAD=0``): the
  block stays in the heap and the next step reuses it.  Values are
  unchanged.  The cost is memory: freed memory stays with the process, and
  the heap fragments during the first steps until the block fits, so the
  resident set settles higher (ResNet-20 batch 128: fp 1409 MiB after 3
  steps instead of ~800, 4W4A 2094 MiB after 5 steps instead of ~1000).
  Hence opt-in: it acts only when ``PDEQ_JAX_KEEP_HOST_MEMORY=1``.
  Measured in ``results/benchmarks/fp_profile.md`` (CPU time per step
  0.84-0.87x for fp ResNets).

  Call it before the first JAX computation (``train.main`` does, so the
  variable switches it on for every trainer).  Only glibc (Linux).

  Returns:
    Whether the settings were applied.
  """
  # No backend query here: initialising the backend starts the executor
  # threads, whose own arenas would then be kept.
  if (os.environ.get(KEEP_MEMORY_ENV, "0") != "1"
      or not sys.platform.startswith("linux")):
    return False
  name = ctypes.util.find_library("c")
  try:
    libc = ctypes.CDLL(name)
    mallopt = libc.mallopt
  except (OSError, AttributeError, TypeError):
    return False  # not glibc
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0),
              (_M_TRIM_THRESHOLD, 2 ** 31 - 1), (_M_TOP_PAD, 0))
  return all(mallopt(param, value) == 1 for param, value in settings)
