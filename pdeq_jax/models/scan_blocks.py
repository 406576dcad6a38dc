"""Compile a stage's identical blocks once: ``nn.scan`` and its layout.

In a CIFAR ResNet or Stable ResNet every block of a stage after the first
has the same shapes and options, so ``scan_blocks=True`` runs them under
``nn.scan``: XLA traces and compiles one block per stage instead of
``n - 1`` copies (``benchmarks/compile_time.py`` measures the saving).  The
first block of a stage (width change, stride or pooling) stays explicit.

The scanned layout stacks those blocks' variables (every collection:
``params``, ``batch_stats``, ``tv_inputs``) on a leading axis:

    unrolled  stage{s}_block{b}/...        b = 2..n
    scanned   stage{s}_blocks/block/...    leading axis b - 2

:func:`stack_blocks` and :func:`unstack_blocks` convert between the two,
exactly (pure reshuffles of the arrays), for variables, a bare params tree
or anything with the same keys (gradients, optimiser moments); the analysis
helpers (``stable_resnet.applied_kernels``, TV reports) read the unrolled
layout.  The default stays unrolled: existing checkpoints, configs and
imports keep their trees.

On XLA:CPU a plain scan of these blocks trained 20x slower once compiled:
the convolutions of autodiff's transpose rules run on a slow path inside a
while loop (jax-ml/jax#12868).  The scanned blocks therefore trace their
stride-1 convolutions under :func:`pdeq_jax.operators.canonical_conv_grads`
(gradients as NHWC/HWIO convolutions with explicit transposes, same values),
which brings the step back to the unrolled step's time
(``benchmarks/compile_time.py`` measures compile and step times).
A scanned model initialised with the same key
draws different initial values (scan splits the key per block); convert an
unrolled initialisation to get the same start.
"""

from __future__ import annotations

import re
from typing import Any, Callable, List, Mapping, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from pdeq_jax import operators

Array = jax.Array

_BLOCK = re.compile(r"stage(\d+)_block(\d+)")
_STACKED = re.compile(r"stage(\d+)_blocks")
_INNER = "block"  # the scanned cell's only child


class _Cell(nn.Module):
  """One block as a scan body: ``(x, bits) -> (y, y)`` (y: the hidden)."""
  make_block: Callable[..., nn.Module]
  train: bool = False

  @nn.compact
  def __call__(self, x: Array, bits: Any) -> Tuple[Array, Array]:
    with operators.canonical_conv_grads():  # fast convolution gradients
      y = self.make_block(name=_INNER)(x, bits, train=self.train)
    return y, y


def run_blocks(make_block: Callable[..., nn.Module], length: int, x: Array,
               bits: Any, *, train: bool, name: str
               ) -> Tuple[Array, List[Array]]:
  """``length`` identical blocks (``make_block(name=...)`` builds one) under
  ``nn.scan``, as a child ``name`` of the calling compact module.

  Returns the last output and the list of every block's output (the
  unrolled model's ``return_hidden`` entries).
  """
  scanned = nn.scan(_Cell, variable_axes={True: 0},
                    split_rngs={"params": True}, in_axes=(nn.broadcast,),
                    length=length)
  x, ys = scanned(make_block, train, name=name)(x, bits)
  return x, [ys[i] for i in range(length)]


def _is_layout(tree: Mapping[str, Any]) -> bool:
  return any(_BLOCK.fullmatch(k) or _STACKED.fullmatch(k) for k in tree)


def _each_layout(tree: Any, fn: Callable[[dict], dict]) -> Any:
  """``fn`` on the model-level dict(s): ``tree`` itself, or each collection."""
  if not isinstance(tree, Mapping):
    return tree
  if _is_layout(tree):
    return fn(dict(tree))
  return {k: _each_layout(v, fn) for k, v in tree.items()}


def stack_blocks(tree: Any) -> Any:
  """Unrolled -> scanned layout: ``stage{s}_block{2..n}`` stacked into
  ``stage{s}_blocks/block`` (stages of one block stay as they are)."""
  def fn(level: dict) -> dict:
    stages = {}
    for key in level:
      m = _BLOCK.fullmatch(key)
      if m and int(m.group(2)) > 1:
        stages.setdefault(int(m.group(1)), []).append(int(m.group(2)))
    out = {k: v for k, v in level.items()
           if not (_BLOCK.fullmatch(k) and int(_BLOCK.fullmatch(k).group(2))
                   > 1)}
    for s, blocks in stages.items():
      blocks = sorted(blocks)
      if blocks != list(range(2, len(blocks) + 2)):
        raise ValueError(f"stage{s}: blocks {[1] + blocks} are not "
                         f"consecutive from 1")
      if f"stage{s}_blocks" in level:
        raise ValueError(f"stage{s} is both unrolled and stacked")
      subtrees = [level[f"stage{s}_block{b}"] for b in blocks]
      out[f"stage{s}_blocks"] = {_INNER: jax.tree_util.tree_map(
          lambda *a: jnp.stack(a), *subtrees)}
    return out
  return _each_layout(tree, fn)


def unstack_blocks(tree: Any) -> Any:
  """Scanned -> unrolled layout, the inverse of :func:`stack_blocks`."""
  def fn(level: dict) -> dict:
    out = {k: v for k, v in level.items() if not _STACKED.fullmatch(k)}
    for key, sub in level.items():
      m = _STACKED.fullmatch(key)
      if not m:
        continue
      if set(sub) != {_INNER}:
        raise ValueError(f"{key} must hold exactly {{{_INNER!r}: ...}}, got "
                         f"keys {sorted(sub)}")
      leaves = jax.tree_util.tree_leaves(sub[_INNER])
      length = leaves[0].shape[0] if leaves else 0
      for i in range(length):
        name = f"stage{m.group(1)}_block{i + 2}"
        if name in level:
          raise ValueError(f"stage{m.group(1)} is both unrolled and stacked")
        out[name] = jax.tree_util.tree_map(lambda a, i=i: a[i], sub[_INNER])
    return out
  return _each_layout(tree, fn)
