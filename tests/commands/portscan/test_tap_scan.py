"""The scan options: command line, TOML file, validation, and what makeService builds."""

from __future__ import annotations

import ipaddress
import os
import resource

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage

from cmdserver.policy import ScanPolicy, default_max_in_flight
from cmdserver.tap import Options, makeService


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


def test_defaults() -> None:
    scan = parse()["scan-policy"]
    assert [str(n) for n in scan.networks] == ["127.0.0.0/8", "::1/128"]
    assert (scan.max_ports, scan.concurrency, scan.timeout) == (65535, 1024, 1.0)
    assert scan.budget.limit == default_max_in_flight()


def test_command_line() -> None:
    scan = parse("--scan-allow", "10.1.0.0/16", "--scan-allow", "fd00::/8",
                 "--scan-max-ports", "1024", "--scan-concurrency", "50",
                 "--scan-timeout", "0.25", "--scan-max-in-flight", "200")["scan-policy"]
    assert [str(n) for n in scan.networks] == ["10.1.0.0/16", "fd00::/8"]
    assert (scan.max_ports, scan.concurrency, scan.timeout, scan.budget.limit) == (
        1024, 50, 0.25, 200)
    assert scan.allows(ipaddress.ip_address("10.1.2.3"))
    assert not scan.allows(ipaddress.ip_address("127.0.0.1"))  # the default is replaced


def test_toml_file(tmp_path) -> None:
    config = tmp_path / "cmdserver.toml"
    config.write_text('scan-allow = ["192.0.2.0/24"]\nscan-timeout = 3\n'
                      'scan-concurrency = 10\n')
    scan = parse("--config", str(config), "--scan-concurrency", "20")["scan-policy"]
    assert [str(n) for n in scan.networks] == ["192.0.2.0/24"]
    assert (scan.timeout, scan.concurrency) == (3.0, 20)  # the command line wins


@pytest.mark.parametrize(("argv", "message"), [
    (["--scan-allow", "10.0.0.1/8"], "10.0.0.1/8 has host bits set"),
    (["--scan-allow", "localhost"], "does not appear to be an IPv4 or IPv6 network"),
    (["--scan-timeout", "0"], "is not a number of seconds > 0"),
    (["--scan-timeout", "-1"], "is not a number of seconds >= 0"),
    (["--scan-concurrency", "0"], "is not a positive whole number"),
    (["--scan-max-ports", "x"], "is not a whole number"),
    (["--scan-max-in-flight", "0"], "is not a positive whole number"),
])
def test_bad_values(argv: list[str], message: str) -> None:
    with pytest.raises(usage.UsageError, match=message):
        parse(*argv)


def test_bad_toml_value(tmp_path) -> None:
    config = tmp_path / "cmdserver.toml"
    config.write_text('scan-allow = "not a network"\n')
    with pytest.raises(usage.UsageError, match="--scan-allow"):
        parse("--config", str(config))


def test_max_in_flight_default_follows_the_open_files_limit() -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert default_max_in_flight() == min(4096, soft // 2)
    assert default_max_in_flight(ceiling=7) == min(7, soft // 2)


def test_make_service_uses_the_scan_policy(tmp_path) -> None:
    options = parse("--data-dir", str(tmp_path), "--log-source", os.devnull,
                    "--scan-concurrency", "33")
    service = makeService(options, reactor=MemoryReactorClock())
    assert service.core.policy.scan is options["scan-policy"]
    assert service.core.policy.scan.concurrency == 33
    assert service.core.registry.get("portscan") is not None


def test_policy_stays_backward_compatible() -> None:
    from cmdserver.policy import Policy

    policy = Policy(["/tmp"])
    assert isinstance(policy.scan, ScanPolicy)
    assert policy.scan.allows(ipaddress.ip_address("::1"))
