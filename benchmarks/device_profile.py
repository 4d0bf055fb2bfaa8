"""Per-kernel device time of a jitted call, from a JAX profiler trace (no TensorBoard needed).

``kernel_times(fn, n_calls)`` runs ``fn`` under ``jax.profiler.trace``, reads the trace back with
``jax.profiler.ProfileData`` and sums the duration of every event on the GPU plane's stream lines by kernel
name (trailing ``.N``/``_N`` suffixes folded together), per call of ``fn``; since kernels may overlap
(``model_runner.COMPILER_OPTIONS``), also the time any kernel ran and the time only LoRA kernels ran.
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
      ``{"total_us": summed kernel us per call, "kernels": [(family, us per call, launches per call), ...],
      "span_us": us per call with at least one kernel running, "lora_exposed_us": of it, us with only LoRA
      kernels running}``, kernels sorted by time, over the device plane's stream lines (XLA's op/module
      summary lines are skipped).
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
    intervals, events = [], []
    for line in streams or [line for line in lines if line.name == "XLA Ops"]:
        for ev in line.events:
            fam = _family(ev.name)
            times[fam] += ev.duration_ns / 1e3
            counts[fam] += 1
            intervals.append((ev.start_ns, ev.start_ns + ev.duration_ns, is_lora(fam)))
            events.append((ev.start_ns, ev.duration_ns, ev.name, line.name))
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
    span = _union_ns([(a, b) for a, b, _ in intervals])
    return {"total_us": sum(times.values()) / n_calls, "kernels": kernels, "lines": sorted(set(lines_seen)),
            "scopes": by_scope, "span_us": span / 1e3 / n_calls,
            "lora_exposed_us": (span - _union_ns([(a, b) for a, b, lora in intervals if not lora])) / 1e3 / n_calls,
            "events": sorted(events)}


def print_timeline(prof: dict, anchor: str, index: int, log=print) -> None:
    """Prints the kernels that start between the ``index``-th and the next launch of a kernel whose name
    starts with ``anchor`` (e.g. one decoder layer between two attention kernels), and any still running at
    the first: start and end in us from the first, duration, stream line and name. Shows which kernels
    overlap and where the device idles."""
    starts = [e[0] for e in prof["events"] if e[2].startswith(anchor)]
    if len(starts) < index + 2:
        log(f"  timeline: fewer than {index + 2} {anchor!r} kernels")
        return
    t0, t1 = starts[index], starts[index + 1]
    for start, dur, name, line in prof["events"]:
        if t0 <= start < t1 or (start < t0 < start + dur):  # (a kernel still running when the window opens)
            log(f"  {(start - t0) / 1e3:8.1f} {(start + dur - t0) / 1e3:8.1f} {dur / 1e3:7.1f}  {line[:12]:12s} "
                f"{name[:90]}")


def is_lora(family: str) -> bool:
    """The LoRA kernels of ``pallas_kernels`` (decode, segment and grouping launches)."""
    return family.startswith(("lora_", "segment_tiles", "grouping"))


def _union_ns(intervals) -> float:
    """Length of the union of ``(start, end)`` intervals: the time at least one of them ran. With kernels
    running concurrently (CUDA-graph branches), this, not the sum of durations, is the device's busy time."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def print_kernels(label: str, prof: dict, top: int = 25, per: float = 1.0, log=print) -> None:
    """Prints the ``top`` kernel families of ``kernel_times``; times divided by ``per`` (e.g. steps per call)."""
    log(f"--- {label}: kernel time {prof['total_us'] / per:.0f} us per step, of it {prof['span_us'] / per:.0f} us "
        f"with any kernel running ({prof['lora_exposed_us'] / per:.0f} us with only LoRA kernels running); "
        f"lines {prof['lines']}")
    for name, us, n in prof["kernels"][:top]:
        log(f"  {us / per:9.1f} us  x{n / per:6.1f}  {name[:110]}")
    if prof.get("scopes"):
        log("  by source (XLA op name stack):")
        for where, us in prof["scopes"][:top]:
            log(f"  {us / per:9.1f} us  {where}")
