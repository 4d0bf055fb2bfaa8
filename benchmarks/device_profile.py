"""Per-kernel device time of a jitted call, from a JAX profiler trace (no TensorBoard needed).

``kernel_times(fn, n_calls)`` runs ``fn`` under ``jax.profiler.trace``, reads the trace back with
``jax.profiler.ProfileData`` and sums the duration of every event on the GPU plane's stream lines by kernel
name (trailing ``.N``/``_N`` suffixes folded together), per call of ``fn``.
"""

from __future__ import annotations

import collections
import glob
import re
import tempfile

import jax
from jax.profiler import ProfileData

_SUFFIX = re.compile(r"([._]\d+)+$")
_LAYER = re.compile(r"layer_\d+")


def _family(name: str) -> str:
    return _SUFFIX.sub("", name)


def kernel_times(fn, n_calls: int = 5) -> dict:
    """Runs ``fn()`` (which must block) ``n_calls`` times under the profiler.

    Returns:
      ``{"total_us": device-busy us per call, "kernels": [(family, us per call, launches per call), ...]}``
      sorted by time, over the device plane's stream lines (XLA's op/module summary lines are skipped).
    """
    fn()
    logdir = tempfile.mkdtemp()
    with jax.profiler.trace(logdir):
        for _ in range(n_calls):
            fn()
    path = glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)[0]
    data = ProfileData.from_file(path)
    lines = [line for plane in data.planes if plane.name.startswith("/device:GPU") for line in plane.lines]
    lines_seen = [line.name for line in lines]
    streams = [line for line in lines if line.name.startswith("Stream")]
    times, counts = collections.Counter(), collections.Counter()
    for line in streams or [line for line in lines if line.name == "XLA Ops"]:
        for ev in line.events:
            fam = _family(ev.name)
            times[fam] += ev.duration_ns / 1e3
            counts[fam] += 1
    kernels = [(k, t / n_calls, counts[k] / n_calls) for k, t in times.most_common()]
    # the same time by source location: XLA's op line carries each op's jax name stack (``tf_op``)
    scopes = collections.Counter()
    for line in lines:
        if line.name != "XLA Ops":
            continue
        for ev in line.events:
            try:
                stats = dict(ev.stats)
            except (TypeError, ValueError):
                stats = {}
            where = str(stats.get("tf_op") or stats.get("long_name") or ev.name)
            scopes[_LAYER.sub("layer_N", where)[-140:]] += ev.duration_ns / 1e3
    by_scope = [(k, t / n_calls) for k, t in scopes.most_common()]
    return {"total_us": sum(times.values()) / n_calls, "kernels": kernels, "lines": sorted(set(lines_seen)),
            "scopes": by_scope}


def print_kernels(label: str, prof: dict, top: int = 25, per: float = 1.0, log=print) -> None:
    """Prints the ``top`` kernel families of ``kernel_times``; times divided by ``per`` (e.g. steps per call)."""
    log(f"--- {label}: device busy {prof['total_us'] / per:.0f} us per step; lines {prof['lines']}")
    for name, us, n in prof["kernels"][:top]:
        log(f"  {us / per:9.1f} us  x{n / per:6.1f}  {name[:110]}")
    if prof.get("scopes"):
        log("  by source (XLA op name stack):")
        for where, us in prof["scopes"][:top]:
            log(f"  {us / per:9.1f} us  {where}")
