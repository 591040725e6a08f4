"""twistd plugin: ``twistd cmdserver``; imports cmdserver.tap only when used."""

from twisted.application.service import ServiceMaker

cmdserver = ServiceMaker(
    "cmdserver",
    "cmdserver.tap",
    "Remote diagnostic commands over line, SSH and Perspective Broker doors.",
    "cmdserver",
)
