"""Shared pytest fixtures: real data location and hypothesis profile."""
import os
import pathlib
import tempfile

import pytest
from hypothesis import settings

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # pylint: disable=wrong-import-position

# Many tests build the same small networks: a persistent compilation cache
# (shared by the xdist workers) turns their repeated XLA compiles into reads.
jax.config.update("jax_compilation_cache_dir", os.environ.get(
    "PDEQ_TEST_XLA_CACHE",
    str(pathlib.Path(tempfile.gettempdir()) / "pdeq_jax_test_xla_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
settings.load_profile("ci")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def shared_data_dir() -> pathlib.Path:
  """Where the offline real datasets live (`PDEQ_DATA_DIR` or ../shared/data)."""
  env = os.environ.get("PDEQ_DATA_DIR")
  return pathlib.Path(env) if env else REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
  path = shared_data_dir()
  if not path.exists():
    pytest.fail(f"real test data not found at {path}; set PDEQ_DATA_DIR")
  return path
