"""Runs a notebook top to bottom and saves what it printed and plotted.

    python notebooks/run.py notebooks/02_pde_gcn_cora.py --output=results/notebooks/02_pde_gcn_cora \
        [--set "SEEDS = 1"] [--cwd=.]

Reads the jupytext source (``.py``), runs an extra cell with the ``--set``
assignments right after the ``parameters`` cell (the papermill convention;
the tests use it to run every notebook small), executes every cell in a fresh
``python3`` kernel (any cell error stops it with the cell named) and writes
``<output>/notebook.md`` (each cell's source and text output) and
``<output>/figure_N.png`` (each plotted image).  The committed figures under
``results/notebooks/`` come from here.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import pathlib
import sys
import time
from typing import Optional, Sequence

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def with_parameters(nb, assignments: str):
  """``nb`` with a cell of ``assignments`` after its ``parameters`` cell."""
  import nbformat  # pylint: disable=import-outside-toplevel
  tagged = [i for i, c in enumerate(nb.cells)
            if "parameters" in c.get("metadata", {}).get("tags", [])]
  if len(tagged) != 1:
    raise ValueError(f"a notebook needs exactly one 'parameters' cell, found "
                     f"{len(tagged)}")
  if assignments.strip():
    cell = nbformat.v4.new_code_cell(assignments)
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(tagged[0] + 1, cell)
  return nb


@contextlib.contextmanager
def _checkout_first_on_pythonpath():
  """PYTHONPATH with this checkout first while the kernel starts (the
  kernel inherits it), restored afterwards."""
  before = os.environ.get("PYTHONPATH")
  os.environ["PYTHONPATH"] = os.pathsep.join(
      [str(REPO_ROOT)] + [p for p in (before or "").split(os.pathsep) if p])
  try:
    yield
  finally:
    if before is None:
      os.environ.pop("PYTHONPATH", None)
    else:
      os.environ["PYTHONPATH"] = before


def execute(source: pathlib.Path, assignments: str = "",
            cwd: Optional[pathlib.Path] = None, timeout: int = 3600):
  """Executes the notebook; returns it with its outputs and the wall time."""
  import jupytext  # pylint: disable=import-outside-toplevel
  import nbclient  # pylint: disable=import-outside-toplevel
  nb = with_parameters(jupytext.read(source), assignments)
  start = time.perf_counter()
  # the kernel imports this checkout, whatever is installed
  with _checkout_first_on_pythonpath():
    nbclient.NotebookClient(
        nb, timeout=timeout, kernel_name="python3",
        resources={"metadata": {"path": str(cwd or pathlib.Path.cwd())}}
    ).execute()
  return nb, time.perf_counter() - start


def save_outputs(nb, output: pathlib.Path, title: str, seconds: float) -> None:
  output.mkdir(parents=True, exist_ok=True)
  lines, figures = [f"# {title}", "", f"Executed in {seconds:.0f} s.", ""], 0
  for cell in nb.cells:
    if cell.cell_type != "code":
      continue
    lines += ["```python", cell.source, "```", ""]
    for out in cell.get("outputs", []):
      text = out.get("text") or out.get("data", {}).get("text/markdown")
      if "image/png" in out.get("data", {}):
        figures += 1
        name = f"figure_{figures}.png"
        (output / name).write_bytes(base64.b64decode(out["data"]["image/png"]))
        lines += [f"![{name}]({name})", ""]
      elif out.get("output_type") == "error":
        lines += ["```", "\n".join(out.get("traceback", [])), "```", ""]
      elif text:
        lines += ["```", text.rstrip(), "```", ""]
  (output / "notebook.md").write_text("\n".join(lines))


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("source", type=pathlib.Path,
                      help="the notebook's jupytext source (.py)")
  parser.add_argument("--output", type=pathlib.Path, required=True)
  parser.add_argument("--set", action="append", default=[],
                      help="a parameter assignment, e.g. 'SEEDS = 1'")
  parser.add_argument("--cwd", type=pathlib.Path, default=None,
                      help="the kernel's working directory (default: here)")
  args = parser.parse_args(argv)
  if not args.source.exists():
    parser.error(f"no notebook source at {args.source}")
  nb, seconds = execute(args.source, "\n".join(args.set), args.cwd)
  save_outputs(nb, args.output, args.source.stem, seconds)
  print(f"{args.source.stem}: {seconds:.0f} s -> {args.output}")


if __name__ == "__main__":
  sys.exit(main())
