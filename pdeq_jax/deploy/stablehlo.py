"""StableHLO export of an integer program via ``jax.export``.

:func:`save` writes the serialized artifact (batch size symbolic);
:func:`load` returns a function of the normalised NHWC float32 batch that
runs it with JAX alone: neither the model code nor the program is needed.
"""

from __future__ import annotations

import pathlib
from typing import Any, Callable, Dict

import jax
import jax.numpy as jnp
import numpy as np

from pdeq_jax.deploy import program as prog


def export(program: Dict[str, Any]) -> "jax.export.Exported":
  """The ``jax.export.Exported`` of the program's logits, batch symbolic.

  A PDE-GCN program (:mod:`pdeq_jax.deploy.gcn`): the graph is part of the
  artifact; its input is layer 0's int32 codes ``[num_nodes, width]``."""
  if program.get("model") == "PDEGCN":
    from pdeq_jax.deploy import gcn  # pylint: disable=import-outside-toplevel
    k0 = program["weights"][program["layers"][0]["K"]]
    spec = jax.ShapeDtypeStruct((program["graph"]["num_nodes"], k0.shape[0]),
                                np.int32)
    with jax.enable_x64(True):
      return jax.export.export(jax.jit(lambda q: gcn.run(program, q)))(spec)
  h, w, c = program["image_shape"]
  (batch,) = jax.export.symbolic_shape("batch")
  spec = jax.ShapeDtypeStruct((batch, h, w, c), np.float32)
  with jax.enable_x64(True):  # the stem's int64 accumulator
    return jax.export.export(jax.jit(lambda x: prog.run(program, x)))(spec)


def save(program: Dict[str, Any], path) -> int:
  """Writes the serialized artifact; returns its size in bytes."""
  data = export(program).serialize()
  pathlib.Path(path).write_bytes(data)
  return len(data)


def load(path) -> Callable[[Any], jax.Array]:
  """``x -> logits`` from an artifact written by :func:`save` (``x``: the
  float32 batch, or a PDE-GCN's int32 codes)."""
  exported = jax.export.deserialize(bytearray(pathlib.Path(path).read_bytes()))
  dtype = exported.in_avals[0].dtype

  def call(x):
    with jax.enable_x64(True):
      return exported.call(jnp.asarray(x, dtype))
  return call
