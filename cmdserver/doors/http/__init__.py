"""The HTTP door: a JSON API, XML-RPC and Prometheus metrics on the one command core."""

DOOR = "http"  # the door's name in the audit log, stats and a command's ``doors``
