"""Importing torchvision ResNet-50 / DeepLabV3 weights into the Flax models.

The paper starts every ImageNet and Cityscapes run from pretrained weights
(Sec. 5.2).  These functions map torchvision state-dict names onto
:class:`pdeq_jax.models.resnet50.BottleneckResNet` and
:class:`pdeq_jax.models.deeplabv3.DeepLabV3` variables:

=====================================  =====================================
torchvision                            Flax (``params`` / ``batch_stats``)
=====================================  =====================================
``conv1.weight``                       ``stem/conv/kernel``
``bn1.{weight,bias}``                  ``stem/bn/{scale,bias}``
``bn1.{running_mean,running_var}``     ``batch_stats: stem/bn/{mean,var}``
``layer{s}.{i}.conv{k}.weight``        ``stage{s}_block{i+1}/conv{k}/kernel``
``layer{s}.{i}.bn{k}.*``               ``stage{s}_block{i+1}/bn{k}/*``
``layer{s}.{i}.downsample.0.weight``   ``stage{s}_block{i+1}/shortcut_conv``
``layer{s}.{i}.downsample.1.*``        ``stage{s}_block{i+1}/shortcut_bn``
``fc.{weight,bias}``                   ``head/dense/{kernel,bias}``
``classifier.0.convs.{j}.0/1``         ``head/aspp/branch{j}_{conv,bn}``
``classifier.0.convs.{4}.1/2``         ``head/aspp/pool_{conv,bn}``
``classifier.0.project.0/1``           ``head/aspp/project_{conv,bn}``
``classifier.{1,2}``                   ``head/{conv,bn}``
``classifier.4.{weight,bias}``         ``head/classifier/{kernel,bias}``
=====================================  =====================================

Convolution weights go from OIHW to HWIO, the Dense weight is transposed.
``num_batches_tracked`` is ignored.  The quantizers' α and the TV layers' γ
(``rho``) are left untouched.  Imports are strict: missing keys, unexpected
keys and shape mismatches raise one ``ValueError`` listing all of them.

State dicts are mappings of numpy arrays (or torch tensors, converted with
``.numpy()``); PyTorch is never a runtime dependency and is imported only by
:func:`load_torch_state_dict` for ``.pth`` files.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Dict, List, Mapping, Tuple

import jax.numpy as jnp
import numpy as np

# (torch key, collection, path in the collection, kind)
Entry = Tuple[str, str, Tuple[str, ...], str]
StateDict = Mapping[str, Any]

_BN_FIELDS = (("weight", "params", "scale"), ("bias", "params", "bias"),
              ("running_mean", "batch_stats", "mean"),
              ("running_var", "batch_stats", "var"))
_BLOCK = re.compile(r"^stage(\d+)_block(\d+)$")
_IGNORED_SUFFIX = ".num_batches_tracked"


def _to_numpy(value: Any) -> np.ndarray:
  if isinstance(value, np.ndarray):
    return value
  if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch.Tensor
    return value.detach().cpu().numpy()
  return np.asarray(value)


def normalize_state_dict(state_dict: StateDict) -> Dict[str, np.ndarray]:
  """Numpy arrays, without ``num_batches_tracked`` and a ``module.`` prefix."""
  out = {}
  for key, value in state_dict.items():
    key = str(key)
    if key.endswith(_IGNORED_SUFFIX) or key == "num_batches_tracked":
      continue
    if key.startswith("module."):  # (Distributed)DataParallel checkpoints
      key = key[len("module."):]
    out[key] = _to_numpy(value)
  return out


def _conv(key: str, path: Tuple[str, ...]) -> List[Entry]:
  return [(f"{key}.weight", "params", path + ("kernel",), "conv")]


def _bn(key: str, path: Tuple[str, ...]) -> List[Entry]:
  return [(f"{key}.{field}", collection, path + (name,), "vector")
          for field, collection, name in _BN_FIELDS]


def _resnet_entries(encoder: Mapping[str, Any], prefix: Tuple[str, ...],
                    torch_prefix: str = "", with_fc: bool = True
                    ) -> List[Entry]:
  """Entries for a BottleneckResNet parameter tree ``encoder`` at ``prefix``."""
  if "stem" not in encoder:
    raise ValueError("variables do not hold a BottleneckResNet encoder (no "
                     "'stem' in params)")
  t = torch_prefix
  entries = _conv(f"{t}conv1", prefix + ("stem", "conv"))
  entries += _bn(f"{t}bn1", prefix + ("stem", "bn"))
  blocks = sorted((tuple(int(g) for g in _BLOCK.match(name).groups()), name)
                  for name in encoder if _BLOCK.match(name))
  for (stage, block), name in blocks:
    tk, path = f"{t}layer{stage}.{block - 1}", prefix + (name,)
    for k in (1, 2, 3):
      entries += _conv(f"{tk}.conv{k}", path + (f"conv{k}",))
      entries += _bn(f"{tk}.bn{k}", path + (f"bn{k}",))
    if "shortcut_conv" in encoder[name]:
      entries += _conv(f"{tk}.downsample.0", path + ("shortcut_conv",))
      entries += _bn(f"{tk}.downsample.1", path + ("shortcut_bn",))
  if with_fc and "head" in encoder:
    path = prefix + ("head", "dense")
    entries += [(f"{t}fc.weight", "params", path + ("kernel",), "dense"),
                (f"{t}fc.bias", "params", path + ("bias",), "vector")]
  return entries


def _deeplab_head_entries(head: Mapping[str, Any]) -> List[Entry]:
  """Entries for the DeepLabHead tree at ``params/head``."""
  aspp, path = head["aspp"], ("head", "aspp")
  num_branches = sum(1 for name in aspp if re.match(r"^branch\d+_conv$", name))
  entries = []
  for j in range(num_branches):
    entries += _conv(f"classifier.0.convs.{j}.0", path + (f"branch{j}_conv",))
    entries += _bn(f"classifier.0.convs.{j}.1", path + (f"branch{j}_bn",))
  entries += _conv(f"classifier.0.convs.{num_branches}.1",
                   path + ("pool_conv",))
  entries += _bn(f"classifier.0.convs.{num_branches}.2", path + ("pool_bn",))
  entries += _conv("classifier.0.project.0", path + ("project_conv",))
  entries += _bn("classifier.0.project.1", path + ("project_bn",))
  entries += _conv("classifier.1", ("head", "conv"))
  entries += _bn("classifier.2", ("head", "bn"))
  entries += _conv("classifier.4", ("head", "classifier"))
  entries.append(("classifier.4.bias", "params",
                  ("head", "classifier", "bias"), "vector"))
  return entries


def _to_flax(kind: str, value: np.ndarray) -> np.ndarray:
  if kind == "conv":
    return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value
  if kind == "dense":
    return value.T if value.ndim == 2 else value
  return value


def _to_torch(kind: str, value: np.ndarray) -> np.ndarray:
  if kind == "conv":
    return value.transpose(3, 2, 0, 1)
  if kind == "dense":
    return value.T
  return value


def _get(tree: Mapping[str, Any], path: Tuple[str, ...]) -> Any:
  for name in path:
    tree = tree[name]
  return tree


def _copy_tree(tree: Any) -> Any:
  if isinstance(tree, Mapping):
    return {k: _copy_tree(v) for k, v in tree.items()}
  return tree


def _set(tree: Dict[str, Any], path: Tuple[str, ...], value: Any) -> None:
  for name in path[:-1]:
    tree = tree[name]
  tree[path[-1]] = value


def _problems(kind: str, items: List[str], limit: int = 25) -> str:
  shown = ", ".join(items[:limit])
  more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
  return f"{kind} ({len(items)}): {shown}{more}"


def _apply(state: Dict[str, np.ndarray], variables: Mapping[str, Any],
           entries: List[Entry], ignore: Callable[[str], bool]):
  """Strictly copies ``state`` into a copy of ``variables`` along ``entries``."""
  if "params" not in variables or "batch_stats" not in variables:
    raise ValueError("variables must have 'params' and 'batch_stats' "
                     f"collections, got {sorted(variables)}")
  expected = {e[0] for e in entries}
  missing = sorted(expected - set(state))
  unexpected = sorted(k for k in state if k not in expected and not ignore(k))
  mismatched, converted = [], []
  for key, collection, path, kind in entries:
    if key not in state:
      continue
    try:
      target = _get(variables[collection], path)
    except (KeyError, TypeError):
      raise ValueError(f"variables lack {collection}/{'/'.join(path)} (for "
                       f"{key!r})") from None
    value = _to_flax(kind, state[key])
    if tuple(value.shape) != tuple(target.shape):
      mismatched.append(f"{key}: torch {tuple(state[key].shape)} -> "
                        f"{tuple(value.shape)} vs {collection}/"
                        f"{'/'.join(path)} {tuple(target.shape)}")
      continue
    converted.append((collection, path, jnp.asarray(value, target.dtype)))
  if missing or unexpected or mismatched:
    parts = [_problems(name, items) for name, items in
             (("missing keys", missing), ("unexpected keys", unexpected),
              ("shape mismatches", mismatched)) if items]
    raise ValueError("state dict does not match the model: " +
                     "; ".join(parts))
  out = _copy_tree(variables)
  for collection, path, value in converted:
    _set(out[collection], path, value)
  return out


def _strip_backbone(state: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  if any(k.startswith("backbone.") for k in state):
    return {(k[len("backbone."):] if k.startswith("backbone.") else k): v
            for k, v in state.items()}
  return state


def _encoder(variables: Mapping[str, Any]):
  """``(encoder params, path prefix)``: the root, or ``backbone`` (DeepLab)."""
  params = variables["params"] if "params" in variables else {}
  if "backbone" in params:
    return params["backbone"], ("backbone",)
  return params, ()


def import_torchvision_resnet50(state_dict: StateDict,
                                variables: Mapping[str, Any], *,
                                skip_fc: bool = False) -> Dict[str, Any]:
  """Copies a torchvision ResNet-50 state dict into ResNet-50 variables.

  Also imports an ImageNet ResNet-50 into the encoder of a DeepLabV3
  (``params/backbone``); keys may carry a ``backbone.`` prefix (torchvision's
  segmentation models), whose ``classifier.*`` / ``aux_classifier.*`` keys
  are then ignored (see :func:`import_torchvision_deeplabv3` for the head).

  Args:
    state_dict: torchvision names -> numpy arrays (or torch tensors).
    variables: ``{'params', 'batch_stats'}`` of a
      :class:`~pdeq_jax.models.resnet50.BottleneckResNet` or
      :class:`~pdeq_jax.models.deeplabv3.DeepLabV3` (any stage sizes).
    skip_fc: leave the classifier alone and ignore ``fc.*`` (fine-tuning to
      a different number of classes).  ``fc.*`` is also ignored when the
      target has no classifier (``return_features`` / DeepLabV3).

  Returns:
    New variables (the input is not modified); α and γ are unchanged.

  Raises:
    ValueError: missing or unexpected keys, or shape mismatches (all listed).
  """
  state = _strip_backbone(normalize_state_dict(state_dict))
  encoder, prefix = _encoder(variables)
  with_fc = not skip_fc and "head" in encoder
  entries = _resnet_entries(encoder, prefix, with_fc=with_fc)
  ignore = lambda k: (k.startswith(("classifier.", "aux_classifier.")) or
                      (not with_fc and k.startswith("fc.")))
  return _apply(state, variables, entries, ignore)


def import_torchvision_deeplabv3(state_dict: StateDict,
                                 variables: Mapping[str, Any], *,
                                 ignore_aux: bool = True) -> Dict[str, Any]:
  """Copies a torchvision ``deeplabv3_resnet50`` state dict (encoder + head).

  Keys are ``backbone.*`` (the ResNet-50 without ``fc``) and
  ``classifier.*`` (``DeepLabHead``); ``aux_classifier.*`` (the FCN head we
  do not build) is ignored unless ``ignore_aux=False``.  The ASPP rates and
  output stride are not stored in a state dict; build the model with the
  ones the weights were trained with.

  Raises:
    ValueError: missing or unexpected keys, or shape mismatches (all listed).
  """
  state = normalize_state_dict(state_dict)
  params = variables.get("params", {})
  if "backbone" not in params or "head" not in params:
    raise ValueError("variables do not hold a DeepLabV3 (need 'backbone' and "
                     "'head' in params)")
  entries = _resnet_entries(params["backbone"], ("backbone",), "backbone.",
                            with_fc=False)
  entries += _deeplab_head_entries(params["head"])
  ignore = lambda k: ignore_aux and k.startswith("aux_classifier.")
  return _apply(state, variables, entries, ignore)


def _export(variables: Mapping[str, Any],
            entries: List[Entry]) -> Dict[str, np.ndarray]:
  return {key: np.ascontiguousarray(
      _to_torch(kind, np.asarray(_get(variables[collection], path))))
          for key, collection, path, kind in entries}


def export_torchvision_resnet50(variables: Mapping[str, Any]
                                ) -> Dict[str, np.ndarray]:
  """The inverse of :func:`import_torchvision_resnet50`: torchvision names.

  For a DeepLabV3 the encoder is exported (without ``backbone.`` prefix and
  without ``fc``); ``num_batches_tracked`` is not produced.
  """
  encoder, prefix = _encoder(variables)
  return _export(variables, _resnet_entries(encoder, prefix))


def export_torchvision_deeplabv3(variables: Mapping[str, Any]
                                 ) -> Dict[str, np.ndarray]:
  """The inverse of :func:`import_torchvision_deeplabv3` (no aux head)."""
  params = variables["params"]
  entries = _resnet_entries(params["backbone"], ("backbone",), "backbone.",
                            with_fc=False)
  entries += _deeplab_head_entries(params["head"])
  return _export(variables, entries)


def load_torch_state_dict(path: str) -> Dict[str, np.ndarray]:
  """Reads a state dict from a ``.pth`` / ``.pt`` (PyTorch) or ``.npz`` file.

  ``.npz`` needs only numpy.  PyTorch files need ``torch`` (imported here
  only; loaded with ``weights_only=True`` on the CPU).  Checkpoints that wrap
  the weights (``{'state_dict': ...}``, ``{'model_state': ...}``,
  ``{'model': ...}``) are unwrapped.

  Raises:
    ImportError: a PyTorch file and no ``torch`` installed.
  """
  path = str(path)
  if path.endswith(".npz"):
    with np.load(path) as data:
      return normalize_state_dict({k: data[k] for k in data.files})
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f"reading the PyTorch checkpoint {path!r} needs the 'torch' package, "
        "which pdeq_jax does not depend on: pip install torch (CPU is "
        "enough), or convert the state dict to .npz elsewhere with "
        "numpy.savez(path, **{k: v.numpy() for k, v in sd.items()})") from e
  obj = torch.load(path, map_location="cpu", weights_only=True)
  for wrapper in ("state_dict", "model_state", "model"):
    if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
      obj = obj[wrapper]
      break
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path!r} holds a {type(obj).__name__}, not a state "
                     "dict")
  return normalize_state_dict(obj)
