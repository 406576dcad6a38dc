"""Planetoid citation graphs (Cora, CiteSeer, PubMed) as ``jraph.GraphsTuple``.

Reads the standard ``ind.<name>.{x,y,tx,ty,allx,ally,graph,test.index}`` files
(Yang, Cohen & Salakhutdinov 2016; the format the GCN and PDE-GCN code uses)
and builds the standard split: train = the labelled nodes of ``y`` (the first
20 per class), val = the next 500 nodes, test = the nodes of ``test.index``.

* ``x``, ``tx``, ``allx`` are pickled scipy sparse feature matrices; ``y``,
  ``ty``, ``ally`` pickled one-hot numpy arrays; ``graph`` a pickled dict of
  adjacency lists; ``test.index`` plain text, one node id per line.
* The rows of ``tx``/``ty`` follow ``test.index`` order: row ``k`` belongs to
  node ``test_index[k]``.  CiteSeer has isolated test nodes that are missing
  from ``test.index`` although they fall inside its range ``min..max``; they
  get all-zero feature rows and label 0 and belong to no mask.
* Features are row-normalised (rows sum to 1; all-zero rows stay zero).
* The graph holds both directions of every edge, no self loops and no
  duplicates, sorted by (sender, receiver); ``graph.edges`` are the
  symmetric-normalised weights ``1/sqrt(d_i d_j)`` with the degrees ``d`` of
  ``A + I`` (as in the GCN / PDE-GCN code).  ``graph.nodes`` is ``None``: the
  features live in :attr:`PlanetoidData.features`.

Where the files are looked for (first complete set wins): the ``data_dir``
argument, else ``$PDEQ_DATA_DIR``, then the cache
``~/.cache/pdeq_jax/planetoid``; each of these may hold the files directly or
in a ``planetoid/`` sub-directory.
Missing files are downloaded (unless ``download=False``) from
``https://github.com/kimiyoung/planetoid/raw/master/data/`` into ``data_dir``
when given, else into the cache, and checked against pinned SHA-256 sums.  The
Cora and CiteSeer sums are pinned; PubMed's are not (``None`` in
:data:`SHA256`): a downloaded PubMed file is only checked to parse, with a
warning.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import pickle
import tempfile
import urllib.request
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import jraph
import numpy as np
import scipy.sparse as sp

PathLike = Union[str, os.PathLike]

NAMES = ("cora", "citeseer", "pubmed")
EXTENSIONS = ("x", "y", "tx", "ty", "allx", "ally", "graph", "test.index")
URL_TEMPLATE = ("https://github.com/kimiyoung/planetoid/raw/master/data/"
                "ind.{name}.{ext}")
ENV_VAR = "PDEQ_DATA_DIR"
DEFAULT_CACHE = pathlib.Path("~/.cache/pdeq_jax/planetoid").expanduser()
NUM_VAL = 500
DOWNLOAD_TIMEOUT_S = 20.0

# SHA-256 of the public files.  PubMed's could not be checked offline: None
# means "not pinned" (the file is then only checked to parse).
SHA256: Dict[str, Optional[str]] = {
    "cora.x":
        "23cfa55d91c6f624233f5eb7b6e3f141f1bd2b2ae39608a63cf5d084bb27baab",
    "cora.y":
        "94465c14eb53e04ca262198dcbb2521ee8af60fb3f3d546cd6ca24a511b0e7d1",
    "cora.tx":
        "b9afbaa4a400df991f6f02ef677e1e44da55ffc04801fd02f9e673987829226a",
    "cora.ty":
        "41f5ac76596a1699cc33f53084a2419e92961c42bb75f36fc38e616d348532ad",
    "cora.allx":
        "9419ba2f26f5c35243db64aba110e0f35a04851609e0dc5433450676ca6b8543",
    "cora.ally":
        "2b998f5cc7fedc86e7f97ca2498f47a1ffc1462c29e2d578b23bf3f62b6e7d71",
    "cora.graph":
        "58f13302f39dde8852dad6fe6d15b89b077b6d7f837626bce671ef80344b383d",
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
SHA256.update({f"pubmed.{ext}": None for ext in EXTENSIONS})


class ChecksumError(ValueError):
  """A downloaded file does not match its pinned SHA-256 (or does not parse)."""


@dataclasses.dataclass(frozen=True, repr=False)
class PlanetoidData:
  """A Planetoid graph with its standard split.

  Attributes:
    name: 'cora', 'citeseer' or 'pubmed'.
    graph: both edge directions, no self loops/duplicates, sorted by (sender,
      receiver); ``edges`` float32 [E] weights ``1/sqrt(d_i d_j)`` (degrees of
      ``A + I``); ``nodes`` is None.
    features: float32 [N, F], row-normalised.
    labels: int32 [N] class ids (0 for CiteSeer's unlabelled isolated nodes).
    train_mask, val_mask, test_mask: bool [N], disjoint.
    num_classes: number of classes.
  """
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
    """Number of nodes N."""
    return int(self.features.shape[0])

  @property
  def num_features(self) -> int:
    """Feature dimension F."""
    return int(self.features.shape[1])

  @property
  def num_edges(self) -> int:
    """Directed edges (twice the undirected count)."""
    return int(np.asarray(self.graph.senders).shape[0])

  def summary(self) -> str:
    """One line: nodes, features, classes, edges and split sizes."""
    return (f"{self.name}: {self.num_nodes} nodes, {self.num_features} "
            f"features, {self.num_classes} classes, {self.num_edges // 2} "
            f"undirected edges ({self.num_edges} directed), train/val/test "
            f"{int(self.train_mask.sum())}/{int(self.val_mask.sum())}/"
            f"{int(self.test_mask.sum())}")

  def __repr__(self) -> str:
    return f"PlanetoidData({self.summary()})"


# --------------------------------------------------------------------------
# Locating and downloading the files
# --------------------------------------------------------------------------


def file_names(name: str) -> List[str]:
  """The eight file names of dataset ``name``."""
  return [f"ind.{name}.{ext}" for ext in EXTENSIONS]


def candidate_dirs(data_dir: Optional[PathLike] = None) -> List[pathlib.Path]:
  """The directories searched, in order.

  ``data_dir`` if given, else ``$PDEQ_DATA_DIR`` if set, then the cache; each
  both as is and with a ``planetoid/`` sub-directory.
  """
  roots = []
  if data_dir is not None and str(data_dir):
    roots.append(pathlib.Path(data_dir).expanduser())
  elif os.environ.get(ENV_VAR):
    roots.append(pathlib.Path(os.environ[ENV_VAR]).expanduser())
  roots.append(pathlib.Path(DEFAULT_CACHE).expanduser())
  dirs: List[pathlib.Path] = []
  for root in roots:
    for d in (root, root / "planetoid"):
      if d not in dirs:
        dirs.append(d)
  return dirs


def download_dir(data_dir: Optional[PathLike] = None) -> pathlib.Path:
  """Where missing files are downloaded: ``data_dir`` (its ``planetoid/``
  sub-directory if that exists), else the cache."""
  if data_dir is None or not str(data_dir):
    return pathlib.Path(DEFAULT_CACHE).expanduser()
  root = pathlib.Path(data_dir).expanduser()
  return root / "planetoid" if (root / "planetoid").is_dir() else root


def _fetch_url(url: str, dest: pathlib.Path,
               timeout: float = DOWNLOAD_TIMEOUT_S) -> None:
  """Downloads ``url`` to ``dest`` atomically (temporary file, then rename)."""
  dest = pathlib.Path(dest)
  dest.parent.mkdir(parents=True, exist_ok=True)
  with urllib.request.urlopen(url, timeout=timeout) as response:
    payload = response.read()
  fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(payload)
    os.replace(tmp, dest)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def _sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _check_parses(path: pathlib.Path, ext: str) -> None:
  """Raises ChecksumError if ``path`` is not a readable ``ind.*.<ext>`` file."""
  try:
    if ext == "test.index":
      np.loadtxt(path, dtype=np.int64, ndmin=1)
    else:
      _load_pickle(path)
  except Exception as e:  # pylint: disable=broad-except
    raise ChecksumError(f"downloaded file {path} is not a valid Planetoid "
                        f"file ({type(e).__name__}: {e})") from e


def verify_local_files(name: str, directory: PathLike) -> None:
  """Checks every local file of ``name`` against its pinned SHA-256.

  Raises:
    ChecksumError: naming the file, its expected and its actual hash, and how
      to fix it.  Files without a pinned sum (PubMed) are checked to parse.
  """
  directory = pathlib.Path(directory)
  for ext in EXTENSIONS:
    path = directory / f"ind.{name}.{ext}"
    expected = SHA256.get(f"{name}.{ext}")
    if expected is None:
      try:
        _check_parses(path, ext)
      except ChecksumError as e:
        raise ChecksumError(
            f"Planetoid file {path} is corrupt: it does not parse "
            f"({e.__cause__ and type(e.__cause__).__name__}); delete it so "
            f"that it is downloaded again, or replace it") from None
      continue
    actual = _sha256(path)
    if actual != expected:
      raise ChecksumError(
          f"Planetoid file {path} fails its checksum (sha256 {actual}, "
          f"expected {expected}; {path.stat().st_size} bytes): the file is "
          f"truncated or corrupt; delete it so that it is downloaded again, "
          f"or replace it with the file from "
          f"{URL_TEMPLATE.format(name=name, ext=ext)}")


def download(name: str, dest_dir: Optional[PathLike] = None, *,
             timeout: float = DOWNLOAD_TIMEOUT_S) -> pathlib.Path:
  """Fetches the files of ``name`` missing from ``dest_dir`` and checks them.

  Each file is fetched to a temporary name, verified (SHA-256 where pinned,
  else parsed, with a warning) and only then renamed into place.

  Args:
    name: dataset name (lower case).
    dest_dir: target directory; default the cache.
    timeout: per-request timeout in seconds.

  Returns:
    ``dest_dir``.

  Raises:
    OSError: network failure (``urllib.error.URLError`` is an OSError).
    ChecksumError: a file does not match its pinned SHA-256 / does not parse.
  """
  dest_dir = pathlib.Path(DEFAULT_CACHE if dest_dir is None else dest_dir)
  dest_dir.mkdir(parents=True, exist_ok=True)
  for ext in EXTENSIONS:
    dest = dest_dir / f"ind.{name}.{ext}"
    if dest.exists():
      continue
    url = URL_TEMPLATE.format(name=name, ext=ext)
    part = dest_dir / f"{dest.name}.part"
    try:
      _fetch_url(url, part, timeout)
      expected = SHA256.get(f"{name}.{ext}")
      if expected is None:
        warnings.warn(f"no pinned SHA-256 for {dest.name}; downloaded file "
                      f"only checked to parse", stacklevel=2)
        _check_parses(part, ext)
      else:
        actual = _sha256(part)
        if actual != expected:
          raise ChecksumError(
              f"checksum mismatch for {dest} downloaded from {url}: sha256 "
              f"{actual}, expected {expected}; the file was discarded")
      os.replace(part, dest)
    finally:
      if part.exists():
        part.unlink()
  return dest_dir


def _missing_report(name: str, dirs: Sequence[pathlib.Path]) -> str:
  lines = []
  for d in dirs:
    if not d.is_dir():
      lines.append(f"  {d}  (directory does not exist)")
      continue
    missing = [f for f in file_names(name) if not (d / f).exists()]
    lines.append(f"  {d}  (missing {len(missing)} of {len(EXTENSIONS)}):")
    lines.extend(f"    {d / f}" for f in missing)
  return "\n".join(lines)


def locate(name: str, data_dir: Optional[PathLike] = None,
           download_missing: Optional[bool] = None) -> pathlib.Path:
  """The directory holding all files of ``name``, downloading if allowed.

  Args:
    name: dataset name (lower case).
    data_dir: see :func:`candidate_dirs`.
    download_missing: None or True fetch missing files (only when no searched
      directory holds the complete set); False never touches the network.

  Raises:
    FileNotFoundError: no complete set found and the download was disabled or
      failed; the message lists every directory and missing file tried.
    ChecksumError: a downloaded file is corrupt.
  """
  dirs = candidate_dirs(data_dir)
  for d in dirs:
    if all((d / f).exists() for f in file_names(name)):
      return d
  report = _missing_report(name, dirs)
  url = URL_TEMPLATE.format(name=name, ext="<ext>")
  target = download_dir(data_dir)
  if download_missing is False:
    status = f"Download disabled (download=False); it would fetch {url}."
  else:
    try:
      return download(name, target)
    except ChecksumError:
      raise
    except OSError as e:  # URLError, timeouts, unwritable directory
      status = (f"Download of {url} into {target} failed: "
                f"{type(e).__name__}: {e}")
  raise FileNotFoundError(
      f"Planetoid files for {name!r} not found. Tried:\n{report}\n{status}\n"
      f"To fix: put the files ind.{name}.{{{','.join(EXTENSIONS)}}} (from "
      f"{url}) in a directory and pass data_dir=<dir>, or set ${ENV_VAR} to it "
      f"(or to its parent holding planetoid/), or allow the download with "
      f"network access.")


# --------------------------------------------------------------------------
# Parsing and building
# --------------------------------------------------------------------------


def _load_pickle(path: pathlib.Path) -> Any:
  """Loads a Planetoid pickle (written by Python 2: latin1 encoding)."""
  with open(path, "rb") as f, warnings.catch_warnings():
    # the pickles name scipy's deprecated ``scipy.sparse.csr`` module
    warnings.simplefilter("ignore", DeprecationWarning)
    return pickle.load(f, encoding="latin1")


def build_graph(adjacency_lists: Mapping[int, Sequence[int]],
                num_nodes: int) -> jraph.GraphsTuple:
  """Symmetric edge set without self loops/duplicates, GCN-normalised weights.

  Args:
    adjacency_lists: node id -> neighbour ids (either direction suffices).
    num_nodes: N; ids outside ``[0, N)`` raise ValueError.

  Returns:
    A GraphsTuple with both directions of each edge, sorted by (sender,
    receiver), ``edges`` float32 ``1/sqrt(d_s d_r)`` with ``d`` the degrees of
    ``A + I``, ``nodes=None``.
  """
  src, dst = [], []
  for i, neighbours in adjacency_lists.items():
    neighbours = np.asarray(list(neighbours), dtype=np.int64).reshape(-1)
    src.append(np.full(neighbours.shape, int(i), np.int64))
    dst.append(neighbours)
  src = np.concatenate(src) if src else np.zeros(0, np.int64)
  dst = np.concatenate(dst) if dst else np.zeros(0, np.int64)
  if src.size and (min(src.min(), dst.min()) < 0
                   or max(src.max(), dst.max()) >= num_nodes):
    raise ValueError(f"adjacency_lists holds node ids outside [0, {num_nodes})")
  keep = src != dst
  src, dst = src[keep], dst[keep]
  keys = np.unique(np.concatenate([src * num_nodes + dst,
                                   dst * num_nodes + src]))  # sorted
  senders = (keys // num_nodes).astype(np.int32)
  receivers = (keys % num_nodes).astype(np.int32)
  degree = np.bincount(senders, minlength=num_nodes).astype(np.float64) + 1.0
  weights = (1.0 / np.sqrt(degree[senders] * degree[receivers])).astype(
      np.float32)
  return jraph.GraphsTuple(
      nodes=None, edges=weights, senders=senders, receivers=receivers,
      n_node=np.array([num_nodes], np.int32),
      n_edge=np.array([senders.shape[0]], np.int32), globals=None)


def row_normalize(features: Union[sp.spmatrix, np.ndarray]) -> np.ndarray:
  """Dense float32 rows scaled to sum 1; all-zero rows stay zero."""
  features = sp.csr_matrix(features, dtype=np.float64)
  sums = np.asarray(features.sum(axis=1)).reshape(-1)
  inv = np.divide(1.0, sums, out=np.zeros_like(sums), where=sums != 0)
  return np.asarray((sp.diags(inv) @ features).todense(), np.float32)


def _mask(num_nodes: int, index: np.ndarray) -> np.ndarray:
  mask = np.zeros(num_nodes, bool)
  mask[index] = True
  return mask


def load_planetoid(name: str, data_dir: Optional[PathLike] = None, *,
                   download: Optional[bool] = None) -> PlanetoidData:
  """Loads Cora, CiteSeer or PubMed with the standard Planetoid split.

  Args:
    name: 'cora', 'citeseer' or 'pubmed' (any case).
    data_dir: directory with the ``ind.<name>.*`` files, or with a
      ``planetoid/`` sub-directory holding them; default ``$PDEQ_DATA_DIR``
      (same two layouts), then ``~/.cache/pdeq_jax/planetoid``.
    download: None (default) or True: fetch files that are missing (into
      ``data_dir`` if given, else the cache) and verify them; False: never
      touch the network.

  Returns:
    A :class:`PlanetoidData`.

  Raises:
    ValueError: unknown ``name``; :class:`ChecksumError` (a ValueError) for a
      corrupt download or a local file that fails its pinned SHA-256 (the
      message names the file and the expected hash).
    FileNotFoundError: files missing; the message lists every path tried.
  """
  key = str(name).lower()
  if key not in NAMES:
    raise ValueError(f"name must be one of {', '.join(NAMES)} (any case), got "
                     f"{name!r}")
  directory = locate(key, data_dir, download)
  verify_local_files(key, directory)
  read = lambda ext: _load_pickle(directory / f"ind.{key}.{ext}")
  y, tx, ty, allx, ally, adjacency = (
      read(e) for e in ("y", "tx", "ty", "allx", "ally", "graph"))
  test_index = np.loadtxt(directory / f"ind.{key}.test.index",
                          dtype=np.int64, ndmin=1)
  test_sorted = np.sort(test_index)
  lo, hi = int(test_sorted[0]), int(test_sorted[-1])
  span = hi - lo + 1
  tx = sp.csr_matrix(tx)
  ty = np.asarray(ty)
  if span != len(test_index):
    # Isolated test nodes (CiteSeer): zero rows for ids missing in the range.
    rows = sp.coo_matrix(tx)
    tx = sp.csr_matrix((rows.data, (test_sorted[rows.row] - lo, rows.col)),
                       shape=(span, tx.shape[1]))
    ty_full = np.zeros((span, ty.shape[1]), ty.dtype)
    ty_full[test_sorted - lo] = ty
    ty = ty_full
  stacked = sp.vstack((sp.csr_matrix(allx), tx)).tocsr()
  onehot = np.vstack((np.asarray(ally), ty))
  num_nodes = stacked.shape[0]
  if hi >= num_nodes:
    raise ValueError(f"ind.{key}.test.index refers to node {hi} but there are "
                     f"only {num_nodes} feature rows")
  # tx rows are stored in test.index order: node test_index[k] takes the row
  # at position test_sorted[k] (the reordering of the reference GCN loader).
  order = np.arange(num_nodes)
  order[test_index] = test_sorted
  features = row_normalize(stacked[order])
  onehot = onehot[order]
  labels = np.argmax(onehot, axis=1).astype(np.int32)
  num_train = len(y)
  train_mask = _mask(num_nodes, np.arange(num_train))
  val_mask = _mask(num_nodes,
                   np.arange(num_train, min(num_train + NUM_VAL, num_nodes)))
  test_mask = _mask(num_nodes, test_index)
  if (train_mask & test_mask).any() or (val_mask & test_mask).any():
    raise ValueError(f"{key}: test.index overlaps the train/val nodes")
  return PlanetoidData(
      name=key, graph=build_graph(adjacency, num_nodes), features=features,
      labels=labels, train_mask=train_mask, val_mask=val_mask,
      test_mask=test_mask, num_classes=int(onehot.shape[1]))


def to_dense_adjacency(graph: jraph.GraphsTuple,
                       weighted: bool = False) -> np.ndarray:
  """Dense [N, N] numpy adjacency of a single graph (for tests / small N).

  Entry ``[s, r]`` is 1 (or the edge weight if ``weighted``) for each edge
  ``s -> r``; repeated edges accumulate.
  """
  n = int(np.sum(np.asarray(graph.n_node)))
  adjacency = np.zeros((n, n), np.float32)
  values = (np.asarray(graph.edges, np.float32).reshape(-1) if weighted
            else np.ones(np.asarray(graph.senders).shape, np.float32))
  np.add.at(adjacency, (np.asarray(graph.senders), np.asarray(graph.receivers)),
            values)
  return adjacency
