"""Test setup: 8 fake CPU devices and the CPU backend, fixed before jax is imported anywhere."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
# libtpu is installed for AOT TPU compiles; without this jax would try to open a TPU at start-up.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
# TPU AOT-compile tests run in parallel workers; they only compile, so libtpu's single-process lock is not needed.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import sys  # noqa: E402
import tempfile  # noqa: E402

from absl import flags  # noqa: E402

# grain worker processes read absl flags and raise UnparsedFlagAccessError until they are parsed; parse them once.
if not flags.FLAGS.is_parsed():
  flags.FLAGS(sys.argv[:1])

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


import jax  # noqa: E402
import pytest  # noqa: E402

# The tests that run `python -m ardiff ...` in subprocesses (end-to-end training, faults and resume, multi-host jobs)
# compile the same tiny programs again in every process; JAX's persistent compilation cache lets a rerun load them
# (measured on 2 cores: 40 steps of a tiny run 244 s -> 64 s with the cache warm). Set here, after jax is imported,
# so only the child processes read it (jax reads these variables at import). Keys cover the HLO, the flags and the
# jax version, so an entry is only ever reused for the identical program.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"ardiff-tests-xla-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(1 << 30))


@pytest.fixture(scope="module")
def fast_compiles():
  """XLA with most optimisation passes off, for a module whose runtime is dozens of small compiles.

  On CPU those passes are 1.5-3x of such a module's time (tests/test_sampling.py + test_tidar_speculative.py: 405 s ->
  238 s). What the tests check does not depend on them: a sampler and the reference it is compared with compile
  alike, and the checks are algorithmic (same logits, same tokens, same distribution), not about XLA's fusions.
  Request it with ``pytestmark = pytest.mark.usefixtures("fast_compiles")``; the old setting is restored after.
  """
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)
