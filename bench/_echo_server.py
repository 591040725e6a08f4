"""The peer for bench/line.py: a bare Twisted ``LineReceiver`` that echoes each line.

Run as its own process: ``python _echo_server.py`` prints ``listening PORT``.
"""

from __future__ import annotations

import sys

from twisted.internet import epollreactor

epollreactor.install()

from twisted.internet import reactor  # noqa: E402
from twisted.internet.protocol import Factory  # noqa: E402
from twisted.protocols.basic import LineReceiver  # noqa: E402


class Echo(LineReceiver):
    delimiter = b"\n"

    def lineReceived(self, line: bytes) -> None:
        self.sendLine(line)


class EchoFactory(Factory):
    protocol = Echo
    noisy = False


def main() -> None:
    port = reactor.listenTCP(0, EchoFactory(), backlog=4096, interface="127.0.0.1")
    print(f"listening {port.getHost().port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    sys.path.pop(0)  # do not let bench/ shadow anything
    main()
