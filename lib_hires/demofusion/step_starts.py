"""Which model evaluations of a sampler start a step, found from the sampler itself.

DemoFusion's skip residual replaces the state each step starts from. Not every model evaluation is a
step start: Heun, DPM2, DPM++ 2S a / SDE and Restart evaluate a predictor point between, DPM-Solver
up to three points per step, and the adaptive solver repeats rejected steps from an unchanged state.
What every sampler does report is its state, as the callback's ``d['x']``. So a step starts at the
evaluation whose input *is* (the same tensor object) a state the sampler reports. Two shapes occur:

* ``REPORTED_AFTER`` (every fixed-step sampler: k-diffusion's, the WebUI's Restart, DPM fast): the
  callback that follows a step's first evaluation reports that evaluation's input. Which evaluations
  these are depends on the schedule only, so :func:`probe` runs the very same function with the very
  same schedule on a tiny tensor with a fake denoiser and lists them; a sampler whose list changes with
  the model's output cannot be driven this way and is refused.
* ``REPORTED_BEFORE`` (the adaptive DPM-Solver, the WebUI's DDIM and PLMS): every attempt starts from the
  initial state or the tensor the last callback reported; a rejected attempt reports that tensor unchanged,
  and :class:`StepStarts` does not add the residual to it a second time.
* ``CORRECTED`` (predictor-corrector multistep solvers: the WebUI's UniPC): the first evaluation takes the
  initial state, every later one a predicted state at the next timestep, and the step goes on from a
  corrected state that no evaluation takes and the callback reports. Each evaluation is the model's value
  for the state at its timestep, so it sees the residual at its input; the corrected state, which the next
  step starts from, gets it in the callback (``on_reported``), at that same timestep; the final state none.

:class:`StepStarts` then tells, evaluation by evaluation, where to write the residual, and checks at
every callback that the reported state is the one that got it, so a sampler that deviates from its
probe raises instead of drifting.
"""
from __future__ import annotations

import contextlib
import inspect
import sys
from dataclasses import dataclass
from typing import Callable

import torch

REPORTED_AFTER = "reported after"
REPORTED_BEFORE = "reported before"
CORRECTED = "corrected"
MAX_PROBE_EVALUATIONS = 20000  # the adaptive solver on a fake model; far above any real schedule


class UnsupportedSampler(ValueError):
    """The sampler's step structure cannot carry the skip residual faithfully."""


class StepTrackingError(RuntimeError):
    """A sampler left the step structure its probe found (raised instead of drifting)."""


@dataclass(frozen=True)
class StepPattern:
    rule: str
    starts: tuple[int, ...]  # REPORTED_AFTER: the evaluation indices that start a step
    evaluations: int         # model evaluations of the probe run (REPORTED_AFTER: of every run)
    reports: int = 0         # CORRECTED: callbacks of every run (the last one reports the final state)


def _name(func) -> str:
    return getattr(func, "__name__", None) or type(func).__name__


class _ProbeModel:
    """The fake denoiser handed to the sampler: calls go to the recorder; attribute reads go to the real
    denoiser (timestep samplers read ``model.inner_model.inner_model.alphas_cumprod``), attribute writes stay
    here (DDIM CFG++ sets its guidance multiplier), and ``last_noise_uncond`` is the last output."""

    def __init__(self, recorder: "_Recorder", real):
        self._recorder, self._real = recorder, real
        self.last_noise_uncond = None

    def __call__(self, x, sigma, *args, **kwargs):
        out = self._recorder.model(x, sigma, *args, **kwargs)
        self.last_noise_uncond = out
        return out

    def __getattr__(self, name: str):
        if name.startswith("_") or self._real is None:
            raise AttributeError(name)
        return getattr(self._real, name)


class _Recorder:
    """A fake denoiser and callback that log evaluations and reports, keeping the tensors alive."""

    def __init__(self, dynamics: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        self.dynamics = dynamics
        self.events: list[tuple[str, torch.Tensor]] = []
        self.evaluations = 0

    def model(self, x, sigma, *args, **kwargs):
        self.evaluations += 1
        if self.evaluations > MAX_PROBE_EVALUATIONS:
            raise UnsupportedSampler("it did not finish a probe run")
        self.events.append(("eval", x))
        return self.dynamics(x, sigma)

    def callback(self, d):
        self.events.append(("report", d["x"]))


def _intervals(events):
    """[(evaluation indices with inputs, reported tensor or None)] split at each report."""
    out, current, index = [], [], 0
    for kind, tensor in events:
        if kind == "eval":
            current.append((index, tensor))
            index += 1
        else:
            out.append((current, tensor))
            current = []
    out.append((current, None))
    return out


def _reported_after(events) -> tuple[int, ...] | None:
    intervals = _intervals(events)
    starts = []
    for evaluations, reported in intervals[:-1]:
        matches = [i for i, x in evaluations if x is reported]
        if len(matches) != 1:
            return None
        starts.append(matches[0])
    return tuple(starts) if starts else None


def _reported_before(x0, events) -> bool:
    intervals = _intervals(events)
    if intervals[-1][0]:
        return False  # evaluations after the last report would start from an unreported state
    expected = x0
    for evaluations, reported in intervals[:-1]:
        if not evaluations or evaluations[0][1] is not expected \
                or any(x is expected for _, x in evaluations[1:]):
            return False
        expected = reported
    return len(intervals) > 1


def _corrected(x0, events) -> int | None:
    """The number of reports if ``events`` have the predictor-corrector shape, else None: one evaluation (two
    before the first report, the first on ``x0``) per report, the last report at most one, and no evaluation on
    ``x0`` again or on any reported state."""
    intervals = _intervals(events)
    reports = len(intervals) - 1
    if reports < 1 or intervals[-1][0] or not intervals[0][0] or intervals[0][0][0][1] is not x0:
        return None
    counts = [len(evaluations) for evaluations, _ in intervals[:-1]]
    if counts[0] != 2 or any(c != 1 for c in counts[1:-1]) or (reports > 1 and counts[-1] > 1):
        return None
    states = [x0] + [reported for _, reported in intervals[:-1]]
    inputs = [x for evaluations, _ in intervals for _, x in evaluations][1:]
    if any(x is state for x in inputs for state in states):
        return None
    return reports


def _zero_noise(like: torch.Tensor):
    return lambda *args, **kwargs: torch.zeros_like(like)


@contextlib.contextmanager
def _isolated_randomness(func, device: torch.device):
    """The real ``torch`` for the sampler's module and k-diffusion's (the WebUI swaps in a ``TorchHijack``
    drawing from ``p.rng``) and a forked global RNG, so a probe consumes no randomness of the job."""
    namespaces = [getattr(inspect.unwrap(func), "__globals__", None)]
    sampling = sys.modules.get("k_diffusion.sampling")
    if sampling is not None:
        namespaces.append(vars(sampling))
    swapped = []
    devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            for namespace in namespaces:
                if namespace is not None and "torch" in namespace and namespace["torch"] is not torch:
                    swapped.append((namespace, namespace["torch"]))
                    namespace["torch"] = torch
            yield
    finally:
        for namespace, previous in reversed(swapped):
            namespace["torch"] = previous


def _probe_run(func, bound: inspect.BoundArguments, x_name: str, model_name: str, dynamics) -> tuple[torch.Tensor, list]:
    x = bound.arguments[x_name]
    tiny = torch.linspace(-1.0, 1.0, 4, device=x.device, dtype=x.dtype).reshape(1, 1, 2, 2)
    recorder = _Recorder(dynamics)
    arguments = dict(bound.arguments)
    arguments[model_name], arguments[x_name] = _ProbeModel(recorder, bound.arguments.get(model_name)), tiny
    parameters = inspect.signature(func).parameters
    for name, value in (("extra_args", {}), ("callback", recorder.callback), ("disable", True),
                        ("noise_sampler", _zero_noise(tiny))):
        if name in parameters:
            arguments[name] = value
    call = inspect.BoundArguments(bound.signature, arguments)
    with _isolated_randomness(func, x.device), torch.no_grad():
        func(*call.args, **call.kwargs)
    return tiny, recorder.events


def _linear_model(x, sigma):
    return 0.5 * x


def _nonlinear_model(x, sigma):
    return torch.sin(3.0 * x) * 0.8


def probe(func, *args, **kwargs) -> StepPattern:
    """The step pattern of ``func(*args, **kwargs)`` (a k-diffusion-style call: model, x, schedule...),
    from two probe runs with different fake dynamics; raises :class:`UnsupportedSampler`."""
    name = _name(func)
    try:
        signature = inspect.signature(func)
        bound = signature.bind(*args, **kwargs)
    except (TypeError, ValueError) as error:
        raise UnsupportedSampler(f"{name}: its arguments do not bind ({error})") from None
    names = list(signature.parameters)
    if len(names) < 2 or "callback" not in signature.parameters:
        raise UnsupportedSampler(f"{name}: it takes no (model, x, ..., callback) arguments")
    model_name, x_name = names[0], names[1]
    if not isinstance(bound.arguments.get(x_name), torch.Tensor):
        raise UnsupportedSampler(f"{name}: its second argument is not the latent")
    try:
        runs = [_probe_run(func, bound, x_name, model_name, dynamics) for dynamics in (_linear_model, _nonlinear_model)]
    except UnsupportedSampler as error:
        raise UnsupportedSampler(f"{name}: {error}") from None
    except (AssertionError, ValueError, IndexError) as error:  # the sampler's own checks of its schedule
        raise UnsupportedSampler(f"{name}: it refuses this schedule ({error or type(error).__name__})") from None
    patterns = [_pattern(x0, events) for x0, events in runs]
    if any(pattern is None for pattern in patterns):
        raise UnsupportedSampler(f"{name}: no model evaluation of each step takes the state its callback reports, "
                                 "so the skip residual has no step start to go to")
    first, second = patterns
    if first.rule != second.rule or (first.rule in (REPORTED_AFTER, CORRECTED) and first != second):
        raise UnsupportedSampler(f"{name}: which evaluations start a step depends on the model's output")
    return first


def _pattern(x0, events) -> StepPattern | None:
    evaluations = sum(1 for kind, _ in events if kind == "eval")
    starts = _reported_after(events)
    if starts is not None:
        return StepPattern(REPORTED_AFTER, starts, evaluations)
    if _reported_before(x0, events):
        return StepPattern(REPORTED_BEFORE, (), evaluations)
    reports = _corrected(x0, events)
    if reports is not None:
        return StepPattern(CORRECTED, (), evaluations, reports)
    return None


def _version(x: torch.Tensor) -> int | None:
    """In-place writes bump it; inference tensors have none (identity alone then)."""
    try:
        return x._version
    except RuntimeError:
        return None


def tracked_call(func, tracker_for: Callable[[StepPattern, torch.Tensor], "StepStarts"], *args, **kwargs):
    """Probes ``func`` for these arguments and returns ``(tracker, args, kwargs)`` for the real call, whose
    callback reports each state to the tracker first (installed even where none was passed)."""
    pattern = probe(func, *args, **kwargs)
    bound = inspect.signature(func).bind(*args, **kwargs)
    x = bound.arguments[list(bound.signature.parameters)[1]]
    tracker = tracker_for(pattern, x)
    callback = bound.arguments.get("callback")

    def report(d):
        tracker.report(d["x"])
        if callback is not None:
            return callback(d)

    bound.arguments["callback"] = report
    return tracker, bound.args, bound.kwargs


class StepStarts:
    """One sampling run's step starts: ask :meth:`is_start` at every evaluation (before the model call),
    tell :meth:`applied` after writing the residual, and pass every callback's state to :meth:`report`."""

    def __init__(self, pattern: StepPattern, x0: torch.Tensor, sampler_name: str = "the sampler",
                 on_reported: Callable[[torch.Tensor], None] | None = None):
        self.pattern, self.sampler_name = pattern, sampler_name
        self.on_reported = on_reported         # CORRECTED: writes the residual into a reported state
        self.starts = frozenset(pattern.starts)
        self.evaluation = 0                    # evaluations seen
        self.residualed: list[tuple[torch.Tensor, int]] = []   # (state, its _version after the write)
        self.reports = 0
        self.expected = x0                     # REPORTED_BEFORE: where the next attempt starts
        self.starts_since_report = 0

    def _carries_residual(self, x: torch.Tensor) -> bool:
        return bool(self.residualed) and self.residualed[-1][0] is x and self.residualed[-1][1] == _version(x)

    def is_start(self, x: torch.Tensor) -> bool:
        index, self.evaluation = self.evaluation, self.evaluation + 1
        if self.pattern.rule == REPORTED_AFTER:
            return index in self.starts
        if self.pattern.rule == CORRECTED:
            self.starts_since_report += 1
            return True
        if x is not self.expected:
            return False
        self.starts_since_report += 1
        return not self._carries_residual(x)  # a rejected attempt restarts from the state that has it

    def applied(self, x: torch.Tensor) -> None:
        self.residualed.append((x, _version(x)))
        del self.residualed[:-1]  # only the latest state is ever compared

    def report(self, x: torch.Tensor) -> None:
        self.reports += 1
        if self.pattern.rule == REPORTED_AFTER:
            ok = self._carries_residual(x) and self.reports <= len(self.pattern.starts)
        elif self.pattern.rule == CORRECTED:
            ok = self.reports <= self.pattern.reports and self.on_reported is not None \
                and (self.starts_since_report >= 1 or self.reports == self.pattern.reports)
            self.starts_since_report = 0
            if ok and self.reports < self.pattern.reports:
                self.on_reported(x)
        else:
            ok, self.starts_since_report, self.expected = self.starts_since_report == 1, 0, x
        if not ok:
            raise StepTrackingError(
                f"DemoFusion lost track of {self.sampler_name}'s steps at callback {self.reports} "
                f"(evaluation {self.evaluation}): the state it reports is not the one that got the skip residual; "
                "stopping instead of drifting from the previous stage")
