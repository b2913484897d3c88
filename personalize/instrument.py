"""Named spans around the phases a profiler wants to time, at no cost unless something listens.

Production code marks its phases; a profiler (the benchmark in `benchmarks/`) listens. That is the
whole seam: nothing outside this module needs patching to be timed.

    with instrument.span("eval.generate"):       # production: around a phase
        ...
    @instrument.timed("metrics.update")          # production: around a whole function
    def update_metrics(...): ...
    instrument.publish("eval.pipeline", pipe)    # production: an object a profiler may hook

    with instrument.listen(lambda name, seconds: ..., clock=my_clock):   # the profiler
        evaluate_run(...)

Without a listener `span` costs one check of a module-level list and returns a shared no-op context
manager; `timed` adds that check to each call. A listener can bring its own clock (the benchmark's
waits for the GPU first, so a span covers the device work queued inside it). Spans nest; each is
reported when it ends, so an outer span includes the time of its inner ones.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True, eq=False)  # identity: `listen` removes exactly its own
class _Listener:
    on_span: Callable[[str, float], None]
    on_object: Callable[[str, Any], None] | None
    clock: Callable[[], float]


_LISTENERS: list[_Listener] = []


class _NoSpan:
    """What `span` returns while nobody listens: enters and exits, doing nothing."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        return None


_NO_SPAN = _NoSpan()


class _Span:
    """Reads each listener's clock on entry and hands it the seconds on exit (also when the body raises)."""

    __slots__ = ("name", "listeners", "starts")

    def __init__(self, name: str, listeners: tuple[_Listener, ...]):
        self.name, self.listeners = name, listeners
        self.starts: list[float] = []

    def __enter__(self) -> None:
        self.starts = [listener.clock() for listener in self.listeners]

    def __exit__(self, *exc) -> None:
        for listener, start in zip(self.listeners, self.starts):
            listener.on_span(self.name, listener.clock() - start)


def span(name: str):
    """A context manager timing the phase `name` for whoever listens (a no-op when nobody does)."""
    if not _LISTENERS:
        return _NO_SPAN
    return _Span(name, tuple(_LISTENERS))


def timed(name: str) -> Callable[[F], F]:
    """Decorator: every call of the function is the span `name`."""
    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if not _LISTENERS:
                return fn(*args, **kwargs)
            with _Span(name, tuple(_LISTENERS)):
                return fn(*args, **kwargs)
        return wrapper  # type: ignore[return-value]
    return decorate


def publish(name: str, obj: Any) -> None:
    """Show `obj` (e.g. the pipeline an evaluation loaded) to listeners that asked for objects.

    For what a profiler cannot time from outside: the benchmark hooks the published pipeline's UNet to
    timestamp every denoising call of a generation.
    """
    for listener in tuple(_LISTENERS):
        if listener.on_object is not None:
            listener.on_object(name, obj)


@contextlib.contextmanager
def listen(on_span: Callable[[str, float], None], *, on_object: Callable[[str, Any], None] | None = None,
           clock: Callable[[], float] = time.perf_counter) -> Iterator[None]:
    """Within the block, `on_span(name, seconds)` is called as each span ends, and `on_object(name, obj)`
    for each published object. Listeners stack; leaving the block removes this one (also on errors)."""
    listener = _Listener(on_span, on_object, clock)
    _LISTENERS.append(listener)
    try:
        yield
    finally:
        _LISTENERS.remove(listener)
