"""Host memory on a CPU backend: let XLA:CPU reuse the pages of its per-step buffers instead of faulting them in anew.

Why: XLA:CPU allocates an executable's temporaries once per execution (one ``posix_memalign`` of 129 MiB for the
4-layer d = 128 AR train step at batch 16 x 128, 219 MiB for its BD3 step) on one of its worker threads. glibc gives
each thread its own arena, whose heaps are capped at 64 MiB, so it serves anything larger with a fresh ``mmap`` and
returns it with ``munmap`` when freed: every page of the step's temporaries is faulted in again each step, as kernel
time (88 of the AR step's 335 ms, 171 of the BD3 step's 722 ms on one core of a 2-core x86 box). With one arena
(``M_ARENA_MAX`` = 1), no mmap-served chunks (``M_MMAP_MAX`` = 0) and a trim threshold of 2 GiB, glibc
serves them from the main heap and keeps the freed pages mapped for the next step: kernel time ~10 ms per step.

Cost: the process keeps its peak heap mapped (freed memory is reused, not handed back to the OS), and all threads
share one arena's lock. Both are right for a training or sampling process on a CPU, and wrong for a host feeding an
accelerator (whose step buffers live on the device), so the CLI applies this only when no accelerator is present.

The settings only reach threads that have not allocated yet, so :func:`keep_freed_memory` must run while the process
has no other thread: before ``import jax`` (its import starts one; its backend, at the first ``jax.devices()``, array
or jit call, starts many). A thread that has allocated holds an arena of its own, and with ``M_ARENA_MAX`` = 1 glibc
hands XLA's new threads the existing arenas in turn, so most of them would still map their buffers afresh (measured
in an IPython kernel, 12 threads: every page of a 96 MiB temporary faulted in each step after the call). ``python -m
ardiff`` calls it before importing the command, with one thread; a notebook kernel runs a dozen, so there set the
same options at process start:
``GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647`` in the
kernel's environment (measured: no page faulted per step). ``ARDIFF_KEEP_HOST_MEMORY=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import glob
import os
import platform
import sys

ENV = "ARDIFF_KEEP_HOST_MEMORY"
# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: freed pages at the heap's top stay mapped up to 2 GiB
# Device nodes of the accelerators JAX drives: TPU (accel, vfio), NVIDIA and AMD GPUs, and WSL2's GPU (dxg: a
# Windows host's NVIDIA GPU has no /dev/nvidia* node inside WSL2).
_ACCELERATOR_NODES = ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*", "/dev/kfd", "/dev/dxg")


def accelerator_present() -> bool:
  """True when this host has a TPU or GPU device node (then JAX's default backend is not the CPU)."""
  if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
    return False
  return any(glob.glob(pattern) for pattern in _ACCELERATOR_NODES)


TUNABLES_HINT = ("GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                 "glibc.malloc.trim_threshold=2147483647")


def _thread_count() -> int:
  """Threads of this process (all of them, not only Python's: a C library's count too)."""
  try:
    return len(os.listdir("/proc/self/task"))
  except OSError:  # no /proc: Python's own count is what is left to go by
    import threading
    return threading.active_count()


def _backend_started() -> bool:
  if "jax" not in sys.modules:
    return False
  from jax._src import xla_bridge  # no public query exists; this is the one JAX itself uses
  return xla_bridge.backends_are_initialized()


def keep_freed_memory() -> tuple[bool, str]:
  """Sets glibc's malloc so the CPU backend's per-step buffers reuse mapped pages (module docstring).

  Returns ``(applied, why)``: ``why`` says what was set, or why nothing was (turned off by ``ARDIFF_KEEP_HOST_MEMORY``,
  an accelerator is present, not glibc, the JAX backend has already started, or other threads already run).
  """
  if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
    return False, f"turned off by {ENV}={os.environ[ENV]}"
  if accelerator_present():
    return False, "an accelerator is present: step buffers live on the device"
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False, f"needs Linux with glibc (this is {platform.system()} {' '.join(platform.libc_ver())})"
  if _backend_started():
    return False, ("the JAX backend has already started (its threads keep their own arenas); call "
                   "ardiff.host_memory.keep_freed_memory() before importing jax")
  threads = _thread_count()
  if threads > 1:  # their arenas stay: with M_ARENA_MAX = 1, glibc hands XLA's new threads those arenas in turn
    return False, (f"{threads - 1} other thread(s) already run (a notebook kernel's, or a library's), and the glibc "
                   f"arenas they hold would still serve XLA's threads; set {TUNABLES_HINT} in the environment the "
                   f"process starts with instead (e.g. the notebook kernel's)")
  libc = ctypes.CDLL(None)
  ok = all(libc.mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)))
  if not ok:
    return False, "glibc refused a mallopt setting"
  return True, (f"glibc malloc keeps freed pages for XLA:CPU's per-step buffers (one arena, no mmap chunks; "
                f"{ENV}=0 to turn off)")
