"""The filter that keeps twisted.conch's routine lines out of the main log."""

from __future__ import annotations

from typing import cast

from twisted.conch.ssh import transport
from twisted.logger import ILogObserver, Logger, LogLevel, LogPublisher
from twisted.python.failure import Failure

from cmdserver.doors.ssh import logfilter


class ConchThing(transport.SSHServerTransport):
    """A conch class as the door subclasses it: its events name this class."""


def test_conch_routine_events_are_dropped_its_trouble_kept():
    seen: list[dict] = []
    observer = cast(ILogObserver, seen.append)
    publisher = LogPublisher(observer)
    before = list(publisher._observers)
    logfilter.install(publisher)
    try:
        t = ConchThing()
        log = t._log  # a Logger for this instance (conch's class attribute)
        log.observer = publisher  # this test's own publisher
        log.debug("NEW KEYS")
        log.info("connection lost")
        log.error("Got remote error, code {code}\nreason: {description}",
                  code=transport.DISCONNECT_BY_APPLICATION, description=b"disconnected by user")
        assert seen == []
        log.error("Got remote error, code {code}\nreason: {description}",
                  code=transport.DISCONNECT_PROTOCOL_ERROR, description=b"bad packet")
        log.warn("other side unimplemented packet #{seqnum}", seqnum=3)
        log.failure("Error decompressing payload", Failure(ValueError("x")))
        assert [e["log_level"] for e in seen] == [LogLevel.error, LogLevel.warn,
                                                  LogLevel.critical]
        Logger(namespace="twisted.conch.ssh.session", observer=publisher).info("Executing")
        Logger(namespace="cmdserver.doors.ssh.door", observer=publisher).info("ours")
        assert seen[-1]["log_format"] == "ours" and len(seen) == 4
        # Removing an observer finds it behind its filter.
        publisher.removeObserver(observer)
        assert publisher._observers == []
    finally:
        logfilter.uninstall(publisher)
    publisher.addObserver(observer)
    logfilter.install(publisher)
    logfilter.install(publisher)
    logfilter.uninstall(publisher)
    assert isinstance(publisher._observers[0], logfilter.QuietConch)  # one door still up
    logfilter.uninstall(publisher)
    assert publisher._observers == before
