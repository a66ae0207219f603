"""Plans for a measured speedup or latency: the MACs target found by timing the files it gives.

This module owns ``plan --target-speedup`` / ``--target-latency-ms``. The widths themselves are
chosen as for a MACs target (:func:`~sfp_onnx.planning.make_plan`: least filter importance per
multiply-add saved); what is searched is the MACs fraction ``f`` whose plan, pruned and timed
in onnxruntime on this machine (provider and batch as asked, interleaved with the original as
``bench`` times them), runs as fast as asked. Each round fits ``speedup = f^-a`` through the
measurements nearest the target (on both sides of it once there are such), so two to four
rounds usually land within the tolerance. Every measurement is cached in ``cache_dir`` per
model file, provider, batch, machine and allocation settings, so a rerun (or another target on
the same model) starts from what is known and measures nothing it already has.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from sfp_onnx._io import write_json
from sfp_onnx.errors import UsageError
from sfp_onnx.graph.analyze import analyze_model
from sfp_onnx.graph.load import load_model, save_model
from sfp_onnx.graph.rewrite import rewrite_model
from sfp_onnx.graph.soft_prune import soft_prune_model
from sfp_onnx.graph.zeros import removable_channels
from sfp_onnx.planning import Plan, make_plan
from sfp_onnx.runtime.bench import BenchConfig, benchmark, machine_info
from sfp_onnx.runtime.target import resolve_round_to

if TYPE_CHECKING:
    from sfp_onnx.training.sensitivity import Sensitivity

__all__ = ["SpeedPoint", "SpeedSearch", "default_cache_dir", "plan_for_speed"]

PathLike = str | os.PathLike


def default_cache_dir() -> Path:
    """Where timed plans are kept: $XDG_CACHE_HOME/sfp-onnx, else ~/.cache/sfp-onnx."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "sfp-onnx")


@dataclass(frozen=True)
class SpeedPoint:
    """One timed plan: the MACs fraction asked, what its file cost, how fast it ran."""

    macs_target: float
    macs_kept: float  # the plan's predicted MACs as a share of the model's
    speedup: float  # p50 of the original / p50 of the pruned file
    latency_ms: float  # p50 of the pruned file
    base_latency_ms: float  # p50 of the original, in the same interleaved run
    confirmed: bool = False  # timed again for longer once it looked like the answer


@dataclass(frozen=True)
class SpeedSearch:
    """How a speed target is searched: what is timed, for how long, and when it stops.

    Attributes:
        batch: the batch size the latency is timed at.
        provider: the onnxruntime provider timed (``cpu``, ``cuda`` or ``tensorrt``).
        seconds: how long each candidate and the original are timed per round (at least 10
            runs each, at most 500); the plan that looks like the answer is timed again for
            twice as long.
        tolerance: a measured speedup this close to the goal (relative) ends the search.
        rounds: at most this many rounds.
        cache_dir: where timed plans are kept for reruns; None keeps none.
    """

    batch: int = 1
    provider: str = "cpu"
    seconds: float = 10.0
    tolerance: float = 0.03
    rounds: int = 6
    cache_dir: PathLike | None = None


def plan_for_speed(
    model: PathLike,
    *,
    target_speedup: float | None = None,
    target_latency_ms: float | None = None,
    round_to: int | str | None = None,
    max_rate: float = 0.7,
    criterion: str = "l2",
    sensitivity: Sensitivity | None = None,
    search: SpeedSearch | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[Plan, list[SpeedPoint]]:
    """The plan whose pruned file runs ``target_speedup``× faster (or under the latency).

    The widths are chosen as :func:`~sfp_onnx.planning.make_plan` chooses them (``round_to``,
    ``max_rate``, ``criterion``; with ``sensitivity`` they weigh the measured loss rises
    instead of the filter scores); ``search`` says how candidates are timed. Returns the plan
    (its ``target`` says what was asked, ``measured`` what the chosen plan's file did) and
    every timed point, cached ones included.
    """
    if (target_speedup is None) == (target_latency_ms is None):
        raise UsageError("give exactly one of --target-speedup and --target-latency-ms")
    if target_speedup is not None and target_speedup <= 1.0:
        raise UsageError(f"--target-speedup must be above 1, got {target_speedup}")
    if target_latency_ms is not None and target_latency_ms <= 0:
        raise UsageError(f"--target-latency-ms must be positive, got {target_latency_ms}")
    search = search or SpeedSearch()
    multiple = resolve_round_to(round_to)
    settings = {"batch": search.batch, "provider": search.provider, "round_to": multiple,
                "max_rate": max_rate, "criterion": criterion,
                "importance": _importance_key(sensitivity)}  # fmt: skip
    timer = _Timer(model, settings, search, sensitivity, progress or (lambda _message: None))

    def goal() -> float:
        return _goal(timer.points, target_speedup, target_latency_ms)

    timer.run(goal, floor=1.0 - max_rate)
    best = _closest(timer.points, goal())
    if not best.confirmed and abs(best.speedup / goal() - 1) <= 0.05:
        # The search stopped short of the tolerance; a plan said to meet the target still
        # rests on the longer, pooled timing, never on one round.
        best = timer.confirm(best)
    wanted = goal()
    plan = make_plan(model, target_macs=best.macs_target, round_to=multiple, max_rate=max_rate,
                     criterion=criterion, sensitivity=sensitivity)  # fmt: skip
    target = {"speedup": target_speedup} if target_speedup else {"latency_ms": target_latency_ms}
    measured = {**asdict(best), "batch": search.batch, "provider": search.provider,
                "within_5_percent": abs(best.speedup / wanted - 1) <= 0.05}  # fmt: skip
    return replace(plan, target=target, measured=measured), timer.points


class _Timer:
    """The search's state: the timed points (cached ones first) and how to time more."""

    def __init__(
        self, model: PathLike, settings: dict, config: SpeedSearch,
        sensitivity: Sensitivity | None, say: Callable[[str], None],
    ) -> None:  # fmt: skip
        self.model, self.settings, self.config = model, settings, config
        self.sensitivity, self.say = sensitivity, say
        self.cache = _Cache(model, settings, config.cache_dir)
        self.points = self.cache.load()
        if self.points:
            say(f"{len(self.points)} timed plans cached in {self.cache.path}")

    def run(self, goal: Callable[[], float], floor: float) -> None:
        """Time candidates until one is confirmed within the tolerance (or the rounds end)."""
        # A rerun takes what an earlier search confirmed within 5% (it was given as the answer).
        accepted = 0.05 if self.points else self.config.tolerance
        for _ in range(self.config.rounds):
            wanted = goal()  # a latency target's goal moves as the original is timed again
            best = _closest(self.points, wanted)
            if best is not None and best.confirmed and abs(best.speedup / wanted - 1) <= accepted:
                break
            if best is not None and abs(best.speedup / wanted - 1) <= self.config.tolerance:
                self.confirm(best)
                continue
            proposed = _next_fraction(self.points, wanted, floor)
            fraction = _untried(self.points, proposed, wanted, floor)
            if fraction is None:
                break  # converged between two measurements, or nothing left to try on that side
            self.say(f"timing the plan for {fraction:.1%} of the MACs (goal {wanted:.2f}x)")
            point = self.time(fraction, self.config.seconds)
            self.say(f"  {point.speedup:.2f}x ({point.latency_ms:.3g} ms vs "
                     f"{point.base_latency_ms:.3g} ms)")  # fmt: skip
            self.points.append(point)
            self.cache.save(self.points)

    def time(self, fraction: float, seconds: float) -> SpeedPoint:
        """Plan for ``fraction`` of the MACs, prune to it, time it against the original."""
        return _time_plan(self.model, fraction, self.settings, seconds, self.sensitivity)

    def confirm(self, point: SpeedPoint) -> SpeedPoint:
        """``point`` timed again for twice as long, the two timings pooled by time spent; it
        replaces ``point`` in the points (and the cache) and is returned.

        One round on a shared machine can be off by several percent; the answer is the plan
        whose pooled timing is within the tolerance, not the luckiest single round.
        """
        self.say(f"confirming the plan for {point.macs_target:.1%} of the MACs (longer timing)")
        again = self.time(point.macs_target, 2 * self.config.seconds)
        latency = (point.latency_ms + 2 * again.latency_ms) / 3
        base = (point.base_latency_ms + 2 * again.base_latency_ms) / 3
        confirmed = replace(point, speedup=base / latency, latency_ms=latency,
                            base_latency_ms=base, confirmed=True)  # fmt: skip
        self.say(f"  {confirmed.speedup:.2f}x ({latency:.3g} ms vs {base:.3g} ms)")
        self.points[self.points.index(point)] = confirmed
        self.cache.save(self.points)
        return confirmed


def _goal(points: list[SpeedPoint], speedup: float | None, latency_ms: float | None) -> float:
    """The speedup asked for; a latency target is one over the original's measured latency."""
    if speedup is not None:
        return speedup
    if not points:
        return 2.0  # a first guess, replaced once the original has been timed
    base = sorted(p.base_latency_ms for p in points)[len(points) // 2]
    return max(base / latency_ms, 1.0 + 1e-6)


def _closest(points: list[SpeedPoint], goal: float) -> SpeedPoint | None:
    return min(points, key=lambda p: abs(math.log(p.speedup / goal)), default=None)


def _next_fraction(points: list[SpeedPoint], goal: float, floor: float) -> float:
    """The MACs fraction to time next: ``speedup = f^-a`` through the nearest measurements."""
    below = [p for p in points if p.speedup < goal]
    above = [p for p in points if p.speedup >= goal]
    if below and above:  # interpolate in log-log between the two that bracket the goal
        lo = max(below, key=lambda p: p.speedup)
        hi = min(above, key=lambda p: p.speedup)
        t = math.log(goal / lo.speedup) / math.log(hi.speedup / lo.speedup)
        fraction = math.exp((1 - t) * math.log(lo.macs_kept) + t * math.log(hi.macs_kept))
    else:  # step from the nearest: speedup ~ f^-a, a measured when it can be (else 1)
        near = _closest(points, goal)
        if near is None:
            return min(1.0, 1.0 / goal)
        exponent = 1.0
        if near.macs_kept < 1 and near.speedup > 1:
            exponent = max(0.3, math.log(near.speedup) / -math.log(near.macs_kept))
        fraction = near.macs_target * (near.speedup / goal) ** (1.0 / exponent)
    return min(1.0, max(fraction, floor * floor))


def _untried(points: list[SpeedPoint], fraction: float, goal: float, floor: float) -> float | None:
    """``fraction``, or a step past every measurement if it was timed already; None if none.

    Where the speed is not monotone in the MACs (widths the kernels handle badly) the fit
    can propose a point it has measured; with every measurement on one side of the goal the
    search then steps a fifth past the outermost one, towards the goal, instead of stopping.
    """

    def tried(value: float) -> bool:
        return any(math.isclose(p.macs_target, value, rel_tol=1e-6) for p in points)

    if not tried(fraction):
        return fraction
    targets = [p.macs_target for p in points]
    if all(p.speedup < goal for p in points):
        step = max(min(targets) * 0.8, floor * floor)
    elif all(p.speedup >= goal for p in points):
        step = min(max(targets) * 1.25, 1.0)
    else:
        return None
    return None if tried(step) else step


def _time_plan(
    model: PathLike, fraction: float, settings: dict, seconds: float,
    sensitivity: Sensitivity | None,
) -> SpeedPoint:  # fmt: skip
    """Plan for ``fraction`` of the MACs, prune to it, time it against the original."""
    plan = make_plan(model, target_macs=fraction, round_to=settings["round_to"],
                     max_rate=settings["max_rate"], criterion=settings["criterion"],
                     sensitivity=sensitivity)  # fmt: skip
    batch, provider = (settings["batch"],), settings["provider"]
    with tempfile.TemporaryDirectory(prefix="sfp-onnx-speed-") as folder:
        pruned = Path(folder) / "candidate.onnx"
        _write_pruned(model, plan, settings["criterion"], pruned)
        probe = benchmark([model], BenchConfig(batch_sizes=batch, warmup=1, runs=3,
                                               provider=provider))  # fmt: skip
        per_run = probe.results[0].latency_ms["p50"] / 1e3
        runs = int(min(500, max(10, seconds / (2 * per_run))))
        config = BenchConfig(batch_sizes=batch, runs=runs, warmup=min(10, max(2, runs // 5)),
                             provider=provider)  # fmt: skip
        report = benchmark([model, pruned], config)
    base, candidate = (r.latency_ms["p50"] for r in report.results)
    return SpeedPoint(fraction, plan.predicted_macs / plan.full_macs, base / candidate,
                      candidate, base)  # fmt: skip


def _importance_key(sensitivity: Sensitivity | None) -> str:
    """What the widths weigh, for the cache key: other measured rises, other plans."""
    if sensitivity is None:
        return "filters"
    text = json.dumps(sensitivity.to_json()["rises"], sort_keys=True)
    return "sensitivity-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def _write_pruned(model: PathLike, plan: Plan, criterion: str, path: Path) -> None:
    """The plan's slim model, for timing only (``prune --plan`` writes the checked one)."""
    masked = load_model(model)
    analysis = analyze_model(masked)
    soft_prune_model(masked, analysis.groups, rate=0.0, criterion=criterion,
                     round_to=plan.round_to, counts=plan.removed_counts(analysis))  # fmt: skip
    rewrite_model(masked, analysis, removable_channels(masked, analysis))
    save_model(masked, path)


class _Cache:
    """Timed points of one model file under one set of settings on this machine (JSON)."""

    def __init__(self, model: PathLike, settings: dict, folder: PathLike | None) -> None:
        digest = hashlib.sha256(Path(model).read_bytes()).hexdigest()[:16]
        machine = machine_info()
        self.key = {"model_sha256": digest, **settings, "cpu": machine.get("cpu"),
                    "gpu": machine.get("gpu")}  # fmt: skip
        name = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:12]
        self.path = Path(folder) / f"speed-{name}.json" if folder is not None else None

    def load(self) -> list[SpeedPoint]:
        if self.path is None or not self.path.exists():
            return []
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if data.get("key") != self.key:
                return []
            return [SpeedPoint(**point) for point in data["points"]]
        except (OSError, ValueError, KeyError, TypeError):
            return []  # a damaged cache is measured again, never trusted

    def save(self, points: list[SpeedPoint]) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.path, {"key": self.key, "points": [asdict(p) for p in points]})
