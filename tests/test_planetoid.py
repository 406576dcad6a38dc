"""Tests of the Planetoid loader on the real Cora/CiteSeer files and on a small
generated file set in the same format (PubMed layout, with test-index gaps)."""
import collections
import pathlib
import pickle
import shutil
import urllib.error

import jraph
import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given
from hypothesis import strategies as st

from pdeq_jax.data import planetoid

_REAL_FETCH_URL = planetoid._fetch_url  # before the autouse fixture patches it

EXPECTED = {
    # nodes, features, classes, undirected edges, train, val, test
    "cora": (2708, 1433, 7, 5278, 140, 500, 1000),
    "citeseer": (3327, 3703, 6, 4552, 120, 500, 1000),
}


@pytest.fixture(autouse=True)
def _isolate(monkeypatch, tmp_path_factory):
  """No test sees the user's cache or env var, or touches the network."""
  monkeypatch.setattr(planetoid, "DEFAULT_CACHE",
                      tmp_path_factory.mktemp("cache"))
  monkeypatch.delenv(planetoid.ENV_VAR, raising=False)

  def no_network(url, dest, timeout=None):
    raise urllib.error.URLError(f"network disabled in tests ({url})")

  monkeypatch.setattr(planetoid, "_fetch_url", no_network)


@pytest.fixture(scope="module")
def real(data_dir):
  """Both real datasets, loaded once per module."""
  return {name: planetoid.load_planetoid(name, data_dir, download=False)
          for name in EXPECTED}


@pytest.fixture(scope="module")
def planetoid_dir(data_dir) -> pathlib.Path:
  return data_dir / "planetoid"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_counts(real, name):
  n, f, c, und, tr, va, te = EXPECTED[name]
  d = real[name]
  assert d.name == name
  assert (d.num_nodes, d.num_features, d.num_classes) == (n, f, c)
  assert d.num_edges == 2 * und
  assert int(d.graph.n_edge[0]) == 2 * und and int(d.graph.n_node[0]) == n
  assert (d.train_mask.sum(), d.val_mask.sum(), d.test_mask.sum()) == (
      tr, va, te)
  assert d.features.shape == (n, f) and d.features.dtype == np.float32
  assert d.labels.shape == (n,) and d.labels.dtype == np.int32
  for m in (d.train_mask, d.val_mask, d.test_mask):
    assert m.dtype == np.bool_ and m.shape == (n,)
  assert f"{und} undirected" in d.summary() and name in repr(d)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_masks_disjoint_and_standard(real, name, planetoid_dir):
  d = real[name]
  assert not (d.train_mask & d.val_mask).any()
  assert not (d.train_mask & d.test_mask).any()
  assert not (d.val_mask & d.test_mask).any()
  tr = int(d.train_mask.sum())
  np.testing.assert_array_equal(np.flatnonzero(d.train_mask), np.arange(tr))
  np.testing.assert_array_equal(np.flatnonzero(d.val_mask),
                                np.arange(tr, tr + 500))
  test_index = np.loadtxt(planetoid_dir / f"ind.{name}.test.index", int)
  np.testing.assert_array_equal(np.flatnonzero(d.test_mask),
                                np.sort(test_index))
  # train = first 20 per class
  np.testing.assert_array_equal(np.bincount(d.labels[d.train_mask]),
                                np.full(d.num_classes, 20))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_labels_in_range(real, name):
  d = real[name]
  assert d.labels.min() >= 0 and d.labels.max() < d.num_classes
  for m in (d.train_mask, d.val_mask, d.test_mask):
    assert set(np.unique(d.labels[m])) == set(range(d.num_classes))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_edges_symmetric_sorted_no_loops_or_duplicates(real, name):
  g = real[name].graph
  assert isinstance(g, jraph.GraphsTuple) and g.nodes is None
  s, r = np.asarray(g.senders), np.asarray(g.receivers)
  assert s.dtype == np.int32 and r.dtype == np.int32
  assert not (s == r).any()
  pairs = set(zip(s.tolist(), r.tolist()))
  assert len(pairs) == len(s)  # no duplicates
  assert all((b, a) in pairs for a, b in pairs)  # both directions
  order = np.lexsort((r, s))
  np.testing.assert_array_equal(order, np.arange(len(s)))  # sorted


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_edges_match_raw_graph_dict(real, name, planetoid_dir):
  with open(planetoid_dir / f"ind.{name}.graph", "rb") as f:
    raw = pickle.load(f, encoding="latin1")
  expected = {(min(i, j), max(i, j)) for i, js in raw.items() for j in js
              if i != j}
  g = real[name].graph
  got = {(a, b) for a, b in zip(np.asarray(g.senders).tolist(),
                                np.asarray(g.receivers).tolist()) if a < b}
  assert got == expected


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_edge_weights_gcn_normalised(real, name):
  g = real[name].graph
  adj = planetoid.to_dense_adjacency(g)
  np.testing.assert_array_equal(adj, adj.T)
  assert adj.max() == 1.0 and np.trace(adj) == 0
  deg = adj.sum(axis=1).astype(np.float64) + 1.0  # degrees of A + I
  dense_w = adj / np.sqrt(np.outer(deg, deg))
  np.testing.assert_allclose(planetoid.to_dense_adjacency(g, weighted=True),
                             dense_w, rtol=1e-6, atol=0)
  s, r = np.asarray(g.senders), np.asarray(g.receivers)
  w = np.asarray(g.edges)
  assert w.dtype == np.float32 and w.shape == s.shape
  np.testing.assert_allclose(w, 1.0 / np.sqrt(deg[s] * deg[r]), rtol=1e-6)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_features_row_normalised(real, name):
  x = real[name].features
  sums = x.sum(axis=1)
  nonzero = sums > 0
  np.testing.assert_allclose(sums[nonzero], 1.0, rtol=1e-5)
  assert (x >= 0).all()
  assert (x[~nonzero] == 0).all()


def test_cora_test_rows_reordered_from_tx(real, planetoid_dir):
  d = real["cora"]
  load = lambda ext: planetoid._load_pickle(planetoid_dir / f"ind.cora.{ext}")
  tx, ty, allx = load("tx"), load("ty"), load("allx")
  test_index = np.loadtxt(planetoid_dir / "ind.cora.test.index", int)
  tx = np.asarray(tx.todense(), np.float64)
  tx /= tx.sum(axis=1, keepdims=True)
  np.testing.assert_allclose(d.features[test_index], tx, rtol=1e-6)
  np.testing.assert_array_equal(d.labels[test_index], ty.argmax(1))
  allx = np.asarray(allx[:50].todense(), np.float64)
  allx /= allx.sum(axis=1, keepdims=True)
  np.testing.assert_allclose(d.features[:50], allx, rtol=1e-6)


def test_citeseer_isolated_test_nodes(real, planetoid_dir):
  d = real["citeseer"]
  test_index = np.loadtxt(planetoid_dir / "ind.citeseer.test.index", int)
  span = np.arange(test_index.min(), test_index.max() + 1)
  padded = np.setdiff1d(span, test_index)
  assert len(padded) == 15
  assert d.test_mask.sum() == 1000
  assert not d.test_mask[padded].any()
  assert not (d.train_mask[padded] | d.val_mask[padded]).any()
  assert (d.features[padded] == 0).all()
  assert (d.labels[padded] == 0).all()
  assert d.num_nodes == test_index.min() + len(span)


# --------------------------------------------------------------------------
# Generated PubMed-format files
# --------------------------------------------------------------------------

N_ALLX, N_TRAIN, N_CLASSES = 510, 6, 3
TEST_INDEX = [515, 510, 519, 513, 511, 518, 514, 516]  # gaps: 512, 517
N_NODES = 520


def _node_features(ids, width=N_NODES + 1):
  """Row for node i: (i + 1) at column i and 3 in the last column."""
  ids = np.asarray(ids)
  rows = np.repeat(np.arange(len(ids)), 2)
  cols = np.stack([ids, np.full_like(ids, width - 1)], 1).reshape(-1)
  vals = np.stack([ids + 1.0, np.full(len(ids), 3.0)], 1).reshape(-1)
  return sp.csr_matrix((vals, (rows, cols)), shape=(len(ids), width))


def _onehot(ids):
  return np.eye(N_CLASSES)[np.asarray(ids) % N_CLASSES]


def _write_fake(directory: pathlib.Path, name: str = "pubmed") -> None:
  directory.mkdir(parents=True, exist_ok=True)
  graph = collections.defaultdict(list)
  graph[0] = [1, 1, 0]  # duplicate and self loop
  graph[1] = [2]  # one direction only
  graph[3] = [515]
  graph[515] = [3, 511]
  graph[500] = []  # a node without neighbours
  objects = {
      "x": _node_features(range(N_TRAIN)),
      "y": _onehot(range(N_TRAIN)),
      "allx": _node_features(range(N_ALLX)),
      "ally": _onehot(range(N_ALLX)),
      "tx": _node_features(TEST_INDEX),
      "ty": _onehot(TEST_INDEX),
      "graph": graph,
  }
  for ext, obj in objects.items():
    with open(directory / f"ind.{name}.{ext}", "wb") as f:
      pickle.dump(obj, f, protocol=2)
  (directory / f"ind.{name}.test.index").write_text(
      "\n".join(map(str, TEST_INDEX)) + "\n")


def test_pubmed_format_generated(tmp_path):
  _write_fake(tmp_path)
  d = planetoid.load_planetoid("PubMed", tmp_path, download=False)
  assert d.name == "pubmed" and d.num_nodes == N_NODES
  assert d.num_features == N_NODES + 1 and d.num_classes == N_CLASSES
  gaps = [512, 517]
  real_ids = np.setdiff1d(np.arange(N_NODES), gaps)
  # every node's feature row encodes its own id: test rows were reordered
  np.testing.assert_array_equal(d.features[real_ids, :-1].argmax(1), real_ids)
  np.testing.assert_allclose(d.features[real_ids, real_ids],
                             (real_ids + 1.0) / (real_ids + 4.0), rtol=1e-6)
  np.testing.assert_allclose(d.features[real_ids, -1], 3.0 / (real_ids + 4.0),
                             rtol=1e-6)
  assert (d.features[gaps] == 0).all() and (d.labels[gaps] == 0).all()
  np.testing.assert_array_equal(d.labels[real_ids], real_ids % N_CLASSES)
  np.testing.assert_array_equal(np.flatnonzero(d.train_mask),
                                np.arange(N_TRAIN))
  np.testing.assert_array_equal(np.flatnonzero(d.val_mask),
                                np.arange(N_TRAIN, N_TRAIN + 500))
  np.testing.assert_array_equal(np.flatnonzero(d.test_mask),
                                np.sort(TEST_INDEX))
  pairs = list(zip(np.asarray(d.graph.senders).tolist(),
                   np.asarray(d.graph.receivers).tolist()))
  assert pairs == [(0, 1), (1, 0), (1, 2), (2, 1), (3, 515), (511, 515),
                   (515, 3), (515, 511)]
  w = dict(zip(pairs, np.asarray(d.graph.edges).tolist()))
  # degrees of A + I: node0 2, node1 3, node515 3, node3 2
  assert w[(0, 1)] == pytest.approx(1 / np.sqrt(6))
  assert w[(515, 3)] == pytest.approx(1 / np.sqrt(6))
  assert w[(1, 2)] == pytest.approx(1 / np.sqrt(6))


def test_planetoid_subdir_layout(tmp_path):
  _write_fake(tmp_path / "planetoid")
  d = planetoid.load_planetoid("pubmed", tmp_path, download=False)
  assert d.num_nodes == N_NODES


@given(st.dictionaries(st.integers(0, 11), st.lists(st.integers(0, 11),
                                                    max_size=6), max_size=12))
def test_build_graph_properties(adjacency):
  g = planetoid.build_graph(adjacency, 12)
  s, r = np.asarray(g.senders), np.asarray(g.receivers)
  expected = {(i, j) for i, js in adjacency.items() for j in js if i != j}
  expected |= {(j, i) for i, j in expected}
  assert list(zip(s.tolist(), r.tolist())) == sorted(expected)
  adj = planetoid.to_dense_adjacency(g)
  deg = adj.sum(1) + 1
  np.testing.assert_allclose(np.asarray(g.edges),
                             1 / np.sqrt(deg[s] * deg[r]), rtol=1e-6)


def test_build_graph_rejects_out_of_range_ids():
  with pytest.raises(ValueError, match="outside"):
    planetoid.build_graph({0: [5]}, 3)


# --------------------------------------------------------------------------
# Directory resolution, errors and downloads
# --------------------------------------------------------------------------


def test_bad_name():
  with pytest.raises(ValueError, match="cora, citeseer, pubmed"):
    planetoid.load_planetoid("reddit")


@pytest.mark.parametrize("sub", ["", "planetoid"])
def test_env_var_resolution(monkeypatch, data_dir, sub):
  monkeypatch.setenv(planetoid.ENV_VAR, str(data_dir / sub))
  assert planetoid.locate("cora", None, False) == data_dir / "planetoid"
  d = planetoid.load_planetoid("CORA", download=False)
  assert d.num_nodes == 2708


def test_explicit_dir_beats_env_var(monkeypatch, data_dir, tmp_path):
  monkeypatch.setenv(planetoid.ENV_VAR, str(data_dir))
  _write_fake(tmp_path, "cora")
  assert planetoid.locate("cora", tmp_path, False) == tmp_path
  assert planetoid.candidate_dirs(tmp_path)[:2] == [tmp_path,
                                                    tmp_path / "planetoid"]


def test_cache_dir_used(tmp_path):
  _write_fake(planetoid.DEFAULT_CACHE)
  assert planetoid.locate("pubmed", None, False) == planetoid.DEFAULT_CACHE


def _assert_lists_paths(message, dirs, name):
  for d in dirs:
    assert str(d) in message
  assert planetoid.URL_TEMPLATE.format(name=name, ext="<ext>") in message
  assert planetoid.ENV_VAR in message and "data_dir" in message


def test_missing_files_download_disabled(tmp_path, monkeypatch):
  (tmp_path / "ind.cora.x").write_bytes(b"partial set")
  called = []
  monkeypatch.setattr(planetoid, "_fetch_url",
                      lambda *a, **k: called.append(a))
  with pytest.raises(FileNotFoundError) as err:
    planetoid.load_planetoid("cora", tmp_path, download=False)
  assert not called
  msg = str(err.value)
  _assert_lists_paths(msg, planetoid.candidate_dirs(tmp_path), "cora")
  assert "download=False" in msg
  for f in planetoid.file_names("cora")[1:]:  # each missing file named
    assert str(tmp_path / f) in msg
  assert str(tmp_path / "ind.cora.x") not in msg.split("\n")  # not missing


def test_missing_files_download_fails(tmp_path):
  # the autouse fixture makes every fetch raise URLError
  with pytest.raises(FileNotFoundError) as err:
    planetoid.load_planetoid("citeseer", tmp_path / "nowhere")
  msg = str(err.value)
  _assert_lists_paths(msg, planetoid.candidate_dirs(tmp_path / "nowhere"),
                      "citeseer")
  assert "failed" in msg and "network disabled" in msg
  assert "does not exist" in msg
  assert not list((tmp_path / "nowhere").glob("*.part"))


def _copying_fetch(source_dir, log):
  def fetch(url, dest, timeout=None):
    assert url.startswith("https://github.com/kimiyoung/planetoid/raw/master/"
                          "data/ind.")
    assert timeout is not None and timeout <= 60
    log.append(url)
    shutil.copyfile(pathlib.Path(source_dir) / url.rsplit("/", 1)[1], dest)
  return fetch


def test_download_with_mocked_fetch(tmp_path, monkeypatch, planetoid_dir, real):
  target = tmp_path / "dl"
  target.mkdir()
  shutil.copyfile(planetoid_dir / "ind.cora.graph", target / "ind.cora.graph")
  log = []
  monkeypatch.setattr(planetoid, "_fetch_url",
                      _copying_fetch(planetoid_dir, log))
  d = planetoid.load_planetoid("cora", target, download=True)
  assert len(log) == 7 and not any(u.endswith(".graph") for u in log)
  assert sorted(p.name for p in target.iterdir()) == sorted(
      planetoid.file_names("cora"))
  np.testing.assert_array_equal(d.features, real["cora"].features)
  np.testing.assert_array_equal(np.asarray(d.graph.senders),
                                np.asarray(real["cora"].graph.senders))


def test_download_into_cache_by_default(monkeypatch, planetoid_dir):
  log = []
  monkeypatch.setattr(planetoid, "_fetch_url",
                      _copying_fetch(planetoid_dir, log))
  d = planetoid.load_planetoid("citeseer")  # download=None: fetch if missing
  assert len(log) == 8 and d.num_nodes == 3327
  assert (planetoid.DEFAULT_CACHE / "ind.citeseer.allx").exists()


def test_checksum_mismatch(tmp_path, monkeypatch, planetoid_dir):
  def bad_fetch(url, dest, timeout=None):
    pathlib.Path(dest).write_bytes(b"not the real file")
  monkeypatch.setattr(planetoid, "_fetch_url", bad_fetch)
  with pytest.raises(planetoid.ChecksumError, match="checksum mismatch") as e:
    planetoid.load_planetoid("cora", tmp_path, download=True)
  assert planetoid.SHA256["cora.x"] in str(e.value)
  assert "ind.cora.x" in str(e.value)
  assert not list(tmp_path.iterdir())  # nothing corrupt left behind


def test_pinned_checksums_match_local_copies(planetoid_dir):
  for name in EXPECTED:
    for f in planetoid.file_names(name):
      key = f[len("ind."):]
      assert planetoid._sha256(planetoid_dir / f) == planetoid.SHA256[key], f
  assert all(planetoid.SHA256[f"pubmed.{e}"] is None
             for e in planetoid.EXTENSIONS)


def test_unpinned_pubmed_download_warns_and_parses(tmp_path, monkeypatch):
  source = tmp_path / "src"
  _write_fake(source)
  log = []
  monkeypatch.setattr(planetoid, "_fetch_url", _copying_fetch(source, log))
  with pytest.warns(UserWarning, match="no pinned SHA-256"):
    d = planetoid.load_planetoid("pubmed", tmp_path / "dl")
  assert len(log) == 8 and d.num_nodes == N_NODES

  (source / "ind.pubmed.allx").write_bytes(b"garbage")
  with pytest.warns(UserWarning), pytest.raises(planetoid.ChecksumError,
                                                match="not a valid"):
    planetoid.load_planetoid("pubmed", tmp_path / "dl2")
  assert not (tmp_path / "dl2" / "ind.pubmed.allx").exists()


def test_fetch_url_atomic(tmp_path):
  src = tmp_path / "payload.bin"
  src.write_bytes(b"hello")
  dest = tmp_path / "out" / "file"
  _REAL_FETCH_URL(src.as_uri(), dest, 5.0)  # file:// URL, no network
  assert dest.read_bytes() == b"hello"
  assert [p.name for p in dest.parent.iterdir()] == ["file"]


def test_local_file_checked_against_its_pinned_sha256(tmp_path, planetoid_dir):
  """A corrupt local file (same size, one byte changed) fails its checksum,
  naming the file and the expected hash (issue 15, Part 3 item 8)."""
  for f in planetoid_dir.glob("ind.cora.*"):
    (tmp_path / f.name).write_bytes(f.read_bytes())
  bad = tmp_path / "ind.cora.allx"
  data = bytearray(bad.read_bytes())
  data[len(data) // 2] ^= 0xFF
  bad.write_bytes(bytes(data))
  expected = planetoid.SHA256["cora.allx"]
  with pytest.raises(planetoid.ChecksumError) as info:
    planetoid.load_planetoid("cora", tmp_path, download=False)
  message = str(info.value)
  assert str(bad) in message and f"expected {expected}" in message
  planetoid.verify_local_files("cora", planetoid_dir)  # the real files pass
