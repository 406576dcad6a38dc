"""Checkpoint surgery: start a changed network from a trained one.

The two-phase post-training pipeline of Sec. 5.2 trains a quantized network,
then inserts TV layers (new γ parameters) and fine-tunes.  The new network's
variables are a superset of the old one's: :func:`transplant_variables`
copies every array the two share (same path, same shape) bit for bit and keeps
the fresh initialisation of the new ones (e.g. TV ``rho``, or quantizer
``alpha`` when a float network is quantized).
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Tuple

import flax
import numpy as np

Path = Tuple[str, ...]


def _flat(tree: Any) -> Dict[Path, Any]:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))


def transplant_variables(source: Any, target: Any, *,
                         allow_dropped: Iterable[str] = ()
                         ) -> Tuple[Dict[str, Any], Dict[str, List[str]]]:
  """Copies ``source`` arrays into ``target`` wherever path and shape agree.

  Args:
    source: trained variables (``{"params": ..., "batch_stats": ...}``).
    target: freshly initialised variables of the new network.
    allow_dropped: name fragments of source paths that may be absent from the
      target (e.g. ``"alpha"`` when quantizers are removed); any other source
      array without a place in the target is an error, so a renamed layer can
      never be silently re-initialised.

  Returns:
    (merged variables, report) with the report listing the ``copied``, the
    ``new`` (kept from ``target``) and the ``dropped`` paths.

  Raises:
    ValueError: shape mismatches, or source arrays missing from the target.
  """
  src, tgt = _flat(source), _flat(target)
  allow = tuple(allow_dropped)
  mismatched = [f"{'/'.join(p)}: {np.shape(src[p])} vs {np.shape(tgt[p])}"
                for p in src if p in tgt and np.shape(src[p]) != np.shape(tgt[p])]
  if mismatched:
    raise ValueError("shape mismatch between source and target variables: "
                     + "; ".join(mismatched))
  dropped = [p for p in src if p not in tgt]
  unexpected = [p for p in dropped if not any(a in "/".join(p) for a in allow)]
  if unexpected:
    raise ValueError("source variables with no place in the target network: "
                     + ", ".join("/".join(p) for p in unexpected))
  merged = {p: (np.asarray(src[p]).astype(np.asarray(v).dtype) if p in src
                else v) for p, v in tgt.items()}
  report = {"copied": sorted("/".join(p) for p in tgt if p in src),
            "new": sorted("/".join(p) for p in tgt if p not in src),
            "dropped": sorted("/".join(p) for p in dropped)}
  return flax.traverse_util.unflatten_dict(merged), report
