"""Planetoid citation graphs (Cora, CiteSeer, PubMed) as ``jraph.GraphsTuple``.

Reads the standard ``ind.<name>.{x,y,tx,ty,allx,ally,graph,test.index}`` files
(Yang et al. 2016) and builds the standard split: train = the first 20 nodes
per class (``y``), val = the next 500 nodes, test = ``test.index``.  CiteSeer
has isolated test nodes missing from ``test.index``'s range; their rows are
padded with zeros and they belong to no mask.

Features are row-normalised.  The graph holds both directions of every edge,
no self loops and no duplicates, sorted by (sender, receiver); ``edges`` are the
symmetric-normalised weights ``1/sqrt(d_i d_j)`` with the degrees of ``A + I``.

Files are looked up in ``data_dir``, else ``$PDEQ_DATA_DIR``, else
``~/.cache/pdeq_jax/planetoid`` (a directory holding the files or a
``planetoid/`` sub-directory).  Missing files are downloaded from their public
location, checked against pinned SHA-256 sums (Cora, CiteSeer).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import pickle
import sys
import tempfile
import urllib.request
import warnings
from typing import Dict, List, Optional, Sequence

import jraph
import numpy as np
import scipy.sparse as sp

NAMES = ("cora", "citeseer", "pubmed")
EXTENSIONS = ("x", "y", "tx", "ty", "allx", "ally", "graph", "test.index")
URL_TEMPLATE = ("https://github.com/kimiyoung/planetoid/raw/master/data/"
                "ind.{name}.{ext}")
DEFAULT_CACHE = pathlib.Path("~/.cache/pdeq_jax/planetoid").expanduser()
ENV_VAR = "PDEQ_DATA_DIR"
NUM_VAL = 500

# SHA-256 of the public files; PubMed's could not be checked offline (None).
SHA256: Dict[str, Optional[str]] = {
    "cora.x": "23cfa55d91c6f624233f5eb7b6e3f141f1bd2b2ae39608a63cf5d084bb27baab",
    "cora.y": "94465c14eb53e04ca262198dcbb2521ee8af60fb3f3d546cd6ca24a511b0e7d1",
    "cora.tx": "b9afbaa4a400df991f6f02ef677e1e44da55ffc04801fd02f9e673987829226a",
    "cora.ty": "41f5ac76596a1699cc33f53084a2419e92961c42bb75f36fc38e616d348532ad",
    "cora.allx": "9419ba2f26f5c35243db64aba110e0f35a04851609e0dc5433450676ca6b8543",
    "cora.ally": "2b998f5cc7fedc86e7f97ca2498f47a1ffc1462c29e2d578b23bf3f62b6e7d71",
    "cora.graph": "58f13302f39dde8852dad6fe6d15b89b077b6d7f837626bce671ef80344b383d",
    "cora.test.index":
        "297ce89af2b51a6a194181c7dbe1796c6a1cf9cd9349a88383b1b1e227867875",
    "citeseer.x":
        "d20de19150741e555de0ed037195630fc194114ebc7fd72ced62810148aa22f6",
    "citeseer.y":
        "8ba87e515d8e3ee3cf52f6d2c5b86aa73f11ecad825a808455209ec26cd54924",
    "citeseer.tx":
        "539a8906a2da97628d212f2fdd668c109a8b3f0d36574b59e5d3fd5b5303da21",
    "citeseer.ty":
        "55e5bd1ba1e733a04598753ad1a8d57957f4b8f89e74519f41f4f4938767e4ce",
    "citeseer.allx":
        "2ac30345d95c9ec933a817ee0bdd6a5f077f8c184a20e696910192d534414668",
    "citeseer.ally":
        "f704b2d986dde6c2669934de1f3ae5696a6cf9455c0f6b2646a2d135ea0a1c95",
    "citeseer.graph":
        "d79a4ef9d3e7169aee8946145f6b7306e35bc79bffad26346cfb94e10e9912a7",
    "citeseer.test.index":
        "2af990671580b6b2df5d158d1038f8292e30c9cd821b5453f399659b25b723d4",
}


@dataclasses.dataclass(frozen=True)
class PlanetoidData:
  """A Planetoid graph with its standard split."""
  name: str
  graph: jraph.GraphsTuple
  features: np.ndarray
  labels: np.ndarray
  train_mask: np.ndarray
  val_mask: np.ndarray
  test_mask: np.ndarray
  num_classes: int

  @property
  def num_nodes(self) -> int:
    return int(self.features.shape[0])

  @property
  def num_features(self) -> int:
    return int(self.features.shape[1])

  @property
  def num_edges(self) -> int:
    """Directed edges (twice the undirected count)."""
    return int(self.graph.senders.shape[0])

  def summary(self) -> str:
    return (f"{self.name}: {self.num_nodes} nodes, {self.num_features} "
            f"features, {self.num_classes} classes, {self.num_edges // 2} "
            f"undirected edges, train/val/test {int(self.train_mask.sum())}/"
            f"{int(self.val_mask.sum())}/{int(self.test_mask.sum())}")


def candidate_dirs(data_dir: Optional[os.PathLike]) -> List[pathlib.Path]:
  """The directories searched, in order."""
  roots = []
  if data_dir:
    roots.append(pathlib.Path(data_dir).expanduser())
  elif os.environ.get(ENV_VAR):
    roots.append(pathlib.Path(os.environ[ENV_VAR]).expanduser())
  roots.append(DEFAULT_CACHE)
  dirs = []
  for root in roots:
    for d in (root, root / "planetoid"):
      if d not in dirs:
        dirs.append(d)
  return dirs


def _fetch_url(url: str, dest: pathlib.Path, timeout: float = 30.0) -> None:
  """Downloads ``url`` to ``dest`` atomically."""
  dest.parent.mkdir(parents=True, exist_ok=True)
  with urllib.request.urlopen(url, timeout=timeout) as response:
    payload = response.read()
  with tempfile.NamedTemporaryFile(dir=dest.parent, delete=False) as tmp:
    tmp.write(payload)
  os.replace(tmp.name, dest)


def _sha256(path: pathlib.Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def download(name: str, dest_dir: os.PathLike = DEFAULT_CACHE) -> pathlib.Path:
  """Fetches the missing files of ``name`` into ``dest_dir`` and checks them."""
  dest_dir = pathlib.Path(dest_dir)
  for ext in EXTENSIONS:
    dest = dest_dir / f"ind.{name}.{ext}"
    if not dest.exists():
      _fetch_url(URL_TEMPLATE.format(name=name, ext=ext), dest)
    expected = SHA256.get(f"{name}.{ext}")
    if expected is None:
      warnings.warn(f"no pinned checksum for {dest.name}; not verified")
    elif _sha256(dest) != expected:
      dest.unlink()
      raise ValueError(f"checksum mismatch for {dest} (expected sha256 "
                       f"{expected}); the corrupt file was removed")
  return dest_dir


def locate(name: str, data_dir: Optional[os.PathLike] = None,
           download_missing: Optional[bool] = None) -> pathlib.Path:
  """The directory holding all files of ``name``, downloading if allowed."""
  dirs = candidate_dirs(data_dir)
  for d in dirs:
    if all((d / f"ind.{name}.{ext}").exists() for ext in EXTENSIONS):
      return d
  tried = "\n  ".join(str(d / f"ind.{name}.*") for d in dirs)
  error = None
  if download_missing is None or download_missing:
    try:
      return download(name, DEFAULT_CACHE)
    except (OSError, ValueError) as e:  # URLError is an OSError
      error = e
  raise FileNotFoundError(
      f"Planetoid files for {name!r} not found. Tried:\n  {tried}\n"
      + (f"Download from {URL_TEMPLATE.format(name=name, ext='<ext>')} failed: "
         f"{error}\n" if error is not None else "Download disabled.\n")
      + f"Put the files ind.{name}.{{{','.join(EXTENSIONS)}}} in a directory "
      f"and pass data_dir=... or set ${ENV_VAR}.")


def _load_pickle(path: pathlib.Path):
  with path.open("rb") as f:
    if sys.version_info > (3, 0):
      return pickle.load(f, encoding="latin1")
    return pickle.load(f)


def build_graph(adjacency_lists: Dict[int, Sequence[int]], num_nodes: int
                ) -> jraph.GraphsTuple:
  """Symmetric edge set without self loops/duplicates, GCN-normalised weights."""
  pairs = set()
  for i, neighbours in adjacency_lists.items():
    for j in neighbours:
      if i != j and i < num_nodes and j < num_nodes:
        pairs.add((int(i), int(j)))
        pairs.add((int(j), int(i)))
  edges = np.array(sorted(pairs), dtype=np.int32).reshape(-1, 2)
  senders, receivers = edges[:, 0], edges[:, 1]
  degree = np.bincount(senders, minlength=num_nodes).astype(np.float64) + 1.0
  weights = (1.0 / np.sqrt(degree[senders] * degree[receivers])).astype(
      np.float32)
  return jraph.GraphsTuple(
      nodes=None, edges=weights, senders=senders, receivers=receivers,
      n_node=np.array([num_nodes], np.int32),
      n_edge=np.array([len(senders)], np.int32), globals=None)


def row_normalize(features: sp.spmatrix) -> np.ndarray:
  features = sp.csr_matrix(features, dtype=np.float64)
  sums = np.asarray(features.sum(axis=1)).reshape(-1)
  inv = np.divide(1.0, sums, out=np.zeros_like(sums), where=sums != 0)
  return np.asarray((sp.diags(inv) @ features).todense(), np.float32)


def load_planetoid(name: str, data_dir: Optional[os.PathLike] = None, *,
                   download: Optional[bool] = None) -> PlanetoidData:
  """Loads Cora, CiteSeer or PubMed with the standard Planetoid split.

  Args:
    name: 'cora', 'citeseer' or 'pubmed' (any case).
    data_dir: directory with the ``ind.<name>.*`` files (or a ``planetoid/``
      sub-directory); default ``$PDEQ_DATA_DIR`` then the download cache.
    download: True/None download missing files (None: only if missing);
      False never touches the network.

  Raises:
    ValueError: unknown name or corrupt download.
    FileNotFoundError: files missing (the message lists every path tried).
  """
  key = str(name).lower()
  if key not in NAMES:
    raise ValueError(f"name must be one of {NAMES}, got {name!r}")
  directory = locate(key, data_dir, download)
  read = lambda ext: _load_pickle(directory / f"ind.{key}.{ext}")
  x, y, tx, ty, allx, ally, adjacency = (read(e) for e in EXTENSIONS[:7])
  test_index = np.loadtxt(directory / f"ind.{key}.test.index", dtype=np.int64)
  test_sorted = np.sort(test_index)
  lo, hi = int(test_sorted[0]), int(test_sorted[-1])
  full_range = np.arange(lo, hi + 1)
  if len(full_range) != len(test_index):
    # isolated test nodes (CiteSeer): zero rows for the missing indices
    tx_full = sp.lil_matrix((len(full_range), tx.shape[1]))
    tx_full[test_sorted - lo, :] = tx
    ty_full = np.zeros((len(full_range), ty.shape[1]))
    ty_full[test_sorted - lo, :] = ty
    tx, ty = tx_full, ty_full
  features = sp.vstack((allx, tx)).tolil()
  labels_onehot = np.vstack((ally, ty))
  # test rows are stored in sorted order; put each at its node id
  features[test_index, :] = features[test_sorted, :]
  labels_onehot[test_index, :] = labels_onehot[test_sorted, :]
  num_nodes = features.shape[0]
  labels = np.argmax(labels_onehot, axis=1).astype(np.int32)
  train_mask = np.zeros(num_nodes, bool)
  train_mask[: len(y)] = True
  val_mask = np.zeros(num_nodes, bool)
  val_mask[len(y): len(y) + NUM_VAL] = True
  test_mask = np.zeros(num_nodes, bool)
  test_mask[test_index] = True
  return PlanetoidData(
      name=key, graph=build_graph(adjacency, num_nodes),
      features=row_normalize(features), labels=labels, train_mask=train_mask,
      val_mask=val_mask, test_mask=test_mask,
      num_classes=int(labels_onehot.shape[1]))


def to_dense_adjacency(graph: jraph.GraphsTuple) -> np.ndarray:
  n = int(np.sum(graph.n_node))
  adjacency = np.zeros((n, n), np.float32)
  adjacency[np.asarray(graph.senders), np.asarray(graph.receivers)] = 1.0
  return adjacency
