"""Timing variants side by side, one worker process each, rounds interleaved.

Used by ``gcn_commits.py`` (one worker per commit) and ``step_variants.py``
(one worker per compiler/allocator variant).  A worker reads one request line
on stdin per measurement and answers with one JSON line on stdout.  Rounds
alternate the order of the workers (forward, then reversed) so that a change
of machine load during a round does not favour whichever runs first.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Dict, List, Optional


def reply(proc, name: str) -> str:
  """The next line from worker ``name``; a clear error if it has exited."""
  line = proc.stdout.readline().strip()
  if not line:
    raise RuntimeError(f"the worker {name!r} exited (status {proc.wait()}); "
                       "see its error above")
  return line


def interleaved_rounds(procs: Dict[str, Any], rounds: int, request: str,
                       on_reply: Optional[Callable[[int, str, dict], None]]
                       = None) -> Dict[str, List[dict]]:
  """Sends ``request`` to every worker in ``rounds`` interleaved rounds.

  Returns each worker's JSON replies in order; ``on_reply(round, name,
  reply)`` is called after each one (e.g. to print progress).
  """
  names = list(procs)
  results = {n: [] for n in names}
  for r in range(rounds):
    for n in (names if r % 2 == 0 else names[::-1]):
      procs[n].stdin.write(f"{request}\n")
      procs[n].stdin.flush()
      d = json.loads(reply(procs[n], n))
      results[n].append(d)
      if on_reply is not None:
        on_reply(r, n, d)
  return results
