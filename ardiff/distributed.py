"""Several JAX processes as one job: start-up from environment variables, and the few global agreements the trainer
needs (stop now? how many bytes? every process's data-iterator state).

A pod runs one process per host; ``launch/local.sh --processes N`` runs N on one machine with the same code path.
The launchers set:

* ``ARDIFF_COORDINATOR=host:port``, ``ARDIFF_NUM_PROCESSES=N``, ``ARDIFF_PROCESS_ID=i``: explicit start-up
  (``launch/local.sh``; on CPU the cross-process collectives go over gloo/TCP).
* ``ARDIFF_DISTRIBUTED=1`` alone: ``jax.distributed.initialize()`` discovers everything itself (TPU pods,
  ``launch/tpu_vm.sh``).
* ``ARDIFF_HEARTBEAT_TIMEOUT`` (seconds, default 100): a process that stops answering (killed, host lost) makes the
  others abort after about this long instead of hanging in a collective.

Every helper below is a collective when ``jax.process_count() > 1``: all processes must call it, in the same
order. With one process each is a plain local computation.
"""

from __future__ import annotations

import itertools
import os
import sys
from typing import Sequence

import numpy as np

COORDINATOR_ENV = "ARDIFF_COORDINATOR"
NUM_PROCESSES_ENV = "ARDIFF_NUM_PROCESSES"
PROCESS_ID_ENV = "ARDIFF_PROCESS_ID"
AUTO_ENV = "ARDIFF_DISTRIBUTED"
HEARTBEAT_ENV = "ARDIFF_HEARTBEAT_TIMEOUT"


def _int_env(name: str, default: int | None = None) -> int | None:
  raw = os.environ.get(name, "")
  if raw == "":
    return default
  try:
    return int(raw)
  except ValueError:
    raise ValueError(f"{name}={raw!r} must be an integer.") from None


def initialize_from_env() -> bool:
  """Calls ``jax.distributed.initialize`` when the launcher asked for it; returns whether it did.

  Must run before any other JAX call (it fixes the device list). Raises ValueError naming a bad variable.
  """
  import jax
  coordinator = os.environ.get(COORDINATOR_ENV, "")
  heartbeat = _int_env(HEARTBEAT_ENV, 100)
  if heartbeat is not None and heartbeat < 1:
    raise ValueError(f"{HEARTBEAT_ENV}={heartbeat} must be >= 1 (seconds).")
  if coordinator:
    n, i = _int_env(NUM_PROCESSES_ENV), _int_env(PROCESS_ID_ENV)
    if n is None or i is None or n < 1 or not 0 <= i < n:
      raise ValueError(f"{COORDINATOR_ENV}={coordinator!r} needs {NUM_PROCESSES_ENV}=N >= 1 and "
                       f"{PROCESS_ID_ENV}=i with 0 <= i < N (got N={n}, i={i}); launch/local.sh sets all three.")
    if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
      # CPU devices of different processes talk over TCP (gloo); without it cross-process computations fail.
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
      cache_dir = jax.config.jax_compilation_cache_dir
      if cache_dir:
        # Seen on jax 0.10.2: a resumed gloo job whose programs came partly from the persistent cache and partly
        # from fresh compiles died in a collective ("Received data size doesn't match ... 512 vs 32").
        jax.config.update("jax_compilation_cache_dir", None)
        print(f"ardiff: the persistent compilation cache ({cache_dir}) is not used by multi-process CPU jobs "
              "(gloo collectives); programs are compiled fresh.", file=sys.stderr)
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=n, process_id=i,
                               initialization_timeout=_int_env("ARDIFF_INIT_TIMEOUT", 300),
                               heartbeat_timeout_seconds=heartbeat, shutdown_timeout_seconds=heartbeat)
    return True
  if os.environ.get(AUTO_ENV) == "1":
    jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat, shutdown_timeout_seconds=heartbeat)
    return True
  return False


def is_main() -> bool:
  """Whether this is process 0, the one that prints and writes the run directory's logs."""
  import jax
  return jax.process_index() == 0


_BARRIERS = itertools.count()


def barrier(name: str, timeout_s: int = 1800) -> None:
  """Waits until every process got here (the coordination service's barrier: no device collective, so no gloo
  set-up timeout). ``name`` must be new for each use. No-op with one process."""
  import jax
  if jax.process_count() == 1:
    return
  from jax._src import distributed as jax_distributed
  jax_distributed.global_state.client.wait_at_barrier(f"ardiff/{name}", timeout_s * 1000)


def aligned(jitted, name: str):
  """``jitted`` (a ``jax.jit`` function) whose first call per argument signature compiles ahead of time, then waits
  at a :func:`barrier`, then runs.

  Why: the first collective between processes sets up its gloo context and waits only ~30 s for the others (not
  configurable); a compile that takes one process minutes longer than another (a loaded machine, a compile-cache
  hit on one host only) would fail there. After the barrier the processes enter the computation together.
  With one process it is ``jitted`` itself.
  """
  import jax
  if jax.process_count() == 1:
    return jitted
  compiled = {}

  def call(*args):
    key = (jax.tree.structure(args),
           tuple((getattr(x, "shape", None), str(getattr(x, "dtype", type(x)))) for x in jax.tree.leaves(args)))
    if key not in compiled:
      compiled[key] = jitted.lower(*args).compile()
      barrier(f"{name}/{next(_BARRIERS)}")  # a new id each time; every process counts the same calls
    return compiled[key](*args)

  return call


def _gather(x: np.ndarray) -> np.ndarray:
  """``[process_count, *x.shape]``: every process's ``x`` (same shape and dtype everywhere)."""
  import jax
  if jax.process_count() == 1:
    return np.asarray(x)[None]
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=False))


def any_process(flag: bool) -> bool:
  """True on every process when ``flag`` is true on any (e.g. SIGTERM reached one host)."""
  return bool(_gather(np.int32(bool(flag))).any())


def sum_processes(value: int) -> int:
  """The sum of an integer over all processes."""
  return int(_gather(np.int64(value)).sum())


def gather_strings(text: str) -> list[str]:
  """Every process's ``text``, in process order (small strings: iterator states)."""
  data = np.frombuffer(text.encode("utf-8"), np.uint8)
  lengths = _gather(np.int64(data.size))
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:data.size] = data
  rows = _gather(padded)
  return [bytes(rows[p, :int(n)]).decode("utf-8") for p, n in enumerate(lengths)]


def merge_dicts(parts: Sequence[dict]) -> dict:
  """One dict from every process's dict; keys present on several processes must agree."""
  out = {}
  for part in parts:
    for k, v in part.items():
      if k in out and out[k] != v:
        raise ValueError(f"processes disagree on {k!r}: {out[k]!r} vs {v!r}")
      out[k] = v
  return out
