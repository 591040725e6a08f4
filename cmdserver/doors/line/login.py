"""How each line door endpoint logs clients in: its login mode and TLS client certificates."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from twisted.logger import Logger

from cmdserver.auth.credentials import Credentials
from cmdserver.auth.tls import CertificateLogin, binds_only_loopback, client_ca_endpoint, is_tls
from cmdserver.auth.users import CredentialError
from cmdserver.doors.line.protocol import LineSettings

log = Logger()


def default_login_mode(description: str) -> str:
    """``off`` on an endpoint bound to a loopback address only, else ``required``."""
    return "off" if binds_only_loopback(description) else "required"


def line_door_login(settings: LineSettings, description: str, mode: str | None,
                    client_ca: str | None, credentials: Credentials, reactor: Any
                    ) -> tuple[LineSettings, Any]:
    """The settings for one line endpoint, and its endpoint if it must be built here.

    With ``--tls-client-ca``, an ``ssl:`` endpoint requires a client certificate
    signed by that CA and logs the connection in as the certificate's user.
    """
    mode = mode or default_login_mode(description)
    endpoint = None
    peer_login = None
    if client_ca and is_tls(description):
        try:
            endpoint = client_ca_endpoint(reactor, description, client_ca)
        except CredentialError as e:
            raise SystemExit(f"cmdserver: --line {e}") from None
        peer_login = CertificateLogin(credentials.account)
    log.info("line door {endpoint}: login {mode}{certs}", endpoint=description, mode=mode,
             certs=", client certificates required" if endpoint is not None else "")
    return replace(settings, login=mode, peer_login=peer_login), endpoint
