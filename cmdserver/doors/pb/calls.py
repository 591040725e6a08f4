"""Helpers of the PB door: running-call bookkeeping, streaming sinks, argument checks
and the explicit-table dispatch every remote object uses."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.spread import pb

from cmdserver.core import INTERNAL_ERROR, NOT_FOUND_TEXT, is_deferred
from cmdserver.doors.pb.errors import BadArguments, InternalError, UnknownMethod
from cmdserver.text import escape

log = Logger()

OBSERVER_WINDOW = 64  # observer lines sent and not yet answered; more are dropped


class RunningCalls:
    """The Deferreds still running for one connection, cancelled when it goes."""

    def __init__(self) -> None:
        self._running: set[Deferred] = set()

    def track(self, d: Deferred) -> Deferred:
        if not d.called:
            self._running.add(d)
            d.addBoth(self._forget, d)
        return d

    def _forget(self, result: Any, d: Deferred) -> Any:
        self._running.discard(d)
        return result

    def cancel_all(self) -> None:
        running, self._running = self._running, set()
        for d in running:
            d.cancel()

    def __len__(self) -> int:
        return len(self._running)

    def __bool__(self) -> bool:
        return bool(self._running)


class RemoteSink:
    """An output sink that forwards lines to a client's observer, ``line(text)``.

    At most ``window`` lines are unanswered at once.  A command whose output
    source can wait (``lastlog``'s child: ``registerProducer``) is paused at the
    window and resumed once half of it is answered, so nothing is lost; lines
    beyond ``window`` (from a source that cannot wait, or in the read that
    filled the window, up to 4 windows then) are dropped and counted, and a
    note says how many once the observer catches up.  A slow observer cannot
    make the server buffer without bound.  An observer that fails or
    disappears is left alone; the command runs on.
    """

    def __init__(self, observer: pb.RemoteReference, window: int = OBSERVER_WINDOW) -> None:
        self.observer = observer
        self.window = window
        self.pending = 0
        self.dropped = 0
        self.gone = False
        self.producer: Any = None
        self.paused = False

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer
        self._flow()

    def unregisterProducer(self) -> None:
        self.producer = None
        self.paused = False

    def line(self, text: str) -> None:
        if self.gone:
            return
        limit = self.window if self.producer is None else self.window * 4
        if self.pending >= limit:
            self.dropped += 1
            return
        self._send(text)
        self._flow()

    def _flow(self) -> None:
        """Pause the source at a full window, resume it at half (or when the
        observer is gone: its lines are dropped, the command goes on)."""
        producer = self.producer
        if producer is None:
            return
        if not self.paused and self.pending >= self.window and not self.gone:
            self.paused = True
            producer.pauseProducing()
        elif self.paused and (self.pending <= self.window // 2 or self.gone):
            self.paused = False
            producer.resumeProducing()

    def _send(self, text: str) -> None:
        try:
            d = self.observer.callRemote("line", text)
        except pb.DeadReferenceError:
            self.gone = True
            self._flow()
            return
        self.pending += 1
        d.addCallbacks(self._answered, self._failed)

    def _answered(self, _: Any) -> None:
        self.pending -= 1
        if self.dropped and not self.gone:
            dropped, self.dropped = self.dropped, 0
            self._send(f"[{dropped} lines dropped: the observer was too slow]")
        self._flow()

    def _failed(self, failure: Failure) -> None:
        self.pending -= 1
        if not self.gone:
            self.gone = True
            log.info("pb: observer failed, streaming stopped: {error}",
                     error=escape(failure.getErrorMessage()))  # the client's words
        self._flow()


def check(value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    """Refuse an argument of the wrong type with a one-line error."""
    if isinstance(value, bool) and kind is int or not isinstance(value, kind):
        raise BadArguments(f"{what} must be {_kind_name(kind)}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", list: "a list", bytes: "bytes",
             type(None): "None", float: "a number"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def check_observer(observer: Any) -> pb.RemoteReference | None:
    if observer is not None and not isinstance(observer, pb.RemoteReference):
        raise BadArguments("observer must be a pb.Referenceable with remote_line(text)")
    return observer


def usage(name: str, signature: inspect.Signature) -> str:
    """A remote method's usage in the text doors' style:
    ``usage: lastlog(n=10, observer=None)``."""
    params = list(signature.parameters.values())[1:]  # without self
    words = [p.name if p.default is p.empty else f"{p.name}={p.default!r}" for p in params]
    return f"usage: {name}({', '.join(words)})"


def bad_call(name: str, signature: inspect.Signature, obj: Any, args: Any, kw: Any,
             missing: Callable[[str], str | None] | None = None) -> BadArguments:
    """The error for a call that does not fit ``signature``, worded as a text door's
    usage error: ``unknown argument X; usage: …`` (a text door's ``unknown option``),
    a missing argument as the command's text parser says it (``missing(name)``:
    ``Please provide a path.``), else the usage alone (too many arguments, or a
    missing one the parser has no words for)."""
    unknown = [k for k in kw if k not in signature.parameters or k == "self"]
    if unknown:
        return BadArguments(f"unknown argument {str(unknown[0])[:64]}; {usage(name, signature)}")
    message = None
    if missing is not None:
        try:
            signature.bind_partial(obj, *args, **kw)  # fits but for a missing argument
        except TypeError:
            pass
        else:
            message = missing(name)
    return BadArguments(message or usage(name, signature))


def dispatch(table: dict[str, Callable[..., Any]], signatures: dict[str, inspect.Signature],
             obj: Any, broker: pb.Broker, message: str | bytes, args: Any, kw: Any,
             missing: Callable[[str], str | None] | None = None) -> Any:
    """Call ``table[message]`` with the unserialized arguments; a call that does not
    fit the method's signature is a clean ``BadArguments``.

    Errors are worded as the text doors word the same refusal: an unknown name
    is ``Command not found.``, a bad argument ends with the method's usage, and
    ``missing(name)`` may give the text for a missing required argument.
    """
    if isinstance(message, bytes):
        message = message.decode("utf-8", "replace")
    method = table.get(message)
    if method is None:
        raise UnknownMethod(NOT_FOUND_TEXT)
    args = broker.unserialize(args, obj)
    kw = broker.unserialize(kw, obj)
    try:
        result = method(obj, *args, **kw)
    except BadArguments as e:  # an argument of the wrong type or value
        raise BadArguments(f"{e}; {usage(message, signatures[message])}") from None
    except TypeError as e:
        # The methods turn their own failures into pb.Errors, so a TypeError here is
        # the call not fitting; the signature check (only now: it costs) says how.
        try:
            signatures[message].bind(obj, *args, **kw)
        except TypeError:
            raise bad_call(message, signatures[message], obj, args, kw, missing) from None
        log.failure("pb: {method} failed", Failure(e), method=message)
        raise InternalError(INTERNAL_ERROR) from e
    if is_deferred(result) and result.called:
        # Already answered: hand PB the plain value, sparing it the callbacks it
        # would chain onto a fired Deferred.  Failures (and a result still waiting
        # on another Deferred) keep their path.
        value = result.result
        if not isinstance(value, Failure) and not is_deferred(value):
            result = value
    return broker.serialize(result, obj, method, args, kw)
