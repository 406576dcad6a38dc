"""Shared pytest fixtures: real data location and hypothesis profile."""
import os
import pathlib

import pytest
from hypothesis import settings

os.environ.setdefault("JAX_PLATFORMS", "cpu")

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
