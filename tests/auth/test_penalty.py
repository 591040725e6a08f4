"""Login penalties per source address: keys, growth, cap, forgiveness, memory, exemptions."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial import unittest

from cmdserver.auth.penalty import Penalties, parse_exempt
from cmdserver.sources import address_of as peer_host
from cmdserver.sources import source_key


class SourceKeyTests(unittest.SynchronousTestCase):
    def test_ipv4_is_the_address(self) -> None:
        self.assertEqual(source_key("10.0.0.7"), "10.0.0.7")

    def test_ipv6_is_its_64(self) -> None:
        self.assertEqual(source_key("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::/64")
        self.assertEqual(source_key("2001:db8:1:2:bbbb::9"), "2001:db8:1:2::/64")
        self.assertEqual(source_key("2001:db8:1:3::1"), "2001:db8:1:3::/64")
        self.assertEqual(source_key("fe80::1%eth0"), "fe80::/64")
        self.assertEqual(source_key("::1"), "::/64")

    def test_ipv4_mapped_is_the_ipv4_address(self) -> None:
        self.assertEqual(source_key("::ffff:10.0.0.7"), "10.0.0.7")

    def test_unix_sockets_share_local(self) -> None:
        self.assertEqual(source_key(None), "local")
        self.assertEqual(source_key("local"), "local")

    def test_peer_host(self) -> None:
        self.assertEqual(peer_host("10.0.0.1:5"), "10.0.0.1")
        self.assertEqual(peer_host("[::1]:5"), "::1")
        self.assertEqual(peer_host("local"), "local")


class PenaltyTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.penalties = Penalties(self.clock, step=1.0, cap=60.0)

    def test_each_failure_doubles_up_to_the_cap(self) -> None:
        waits = []
        for _ in range(9):
            waits.append(self.penalties.failure("a"))
            self.clock.advance(waits[-1])  # the next failure once the penalty is over
        self.assertEqual(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60])

    def test_failures_at_once_add_up_to_the_cap(self) -> None:
        self.assertEqual(self.penalties.failure("a"), 1)
        self.assertEqual(self.penalties.failure("a"), 3)  # 1 left + 2
        self.assertEqual(self.penalties.failure("a"), 7)  # 3 left + 4
        for _ in range(10):
            wait = self.penalties.failure("a")
        self.assertEqual(wait, 60)

    def test_the_penalty_runs_down(self) -> None:
        self.penalties.failure("a")
        self.penalties.failure("a")  # 3 s
        self.clock.advance(1)
        self.assertEqual(self.penalties.remaining("a"), 2)
        self.clock.advance(2)
        self.assertEqual(self.penalties.remaining("a"), 0)
        self.assertEqual(self.penalties.remaining("b"), 0)  # never failed

    def test_failures_are_forgiven_one_per_cap_seconds(self) -> None:
        for _ in range(3):
            self.penalties.failure("a")
        self.assertEqual(self.penalties.strikes("a"), 3)
        self.clock.advance(59)
        self.assertEqual(self.penalties.strikes("a"), 3)
        self.clock.advance(1)
        self.assertEqual(self.penalties.strikes("a"), 2)
        self.assertEqual(self.penalties.failure("a"), 4)  # the third failure again
        self.clock.advance(4 + 3 * 60)
        self.assertEqual(self.penalties.strikes("a"), 0)
        self.assertEqual(len(self.penalties), 0)  # forgotten

    def test_an_attacker_at_the_cap_stays_there(self) -> None:
        for _ in range(20):
            wait = self.penalties.failure("a")
            self.clock.advance(wait)
        self.assertEqual(wait, 60)

    def test_a_success_forgives_nothing(self) -> None:
        # There is no success call at all: only time forgives (the module explains why).
        self.assertFalse(hasattr(self.penalties, "success"))

    def test_memory_is_bounded(self) -> None:
        penalties = Penalties(self.clock, max_sources=3)
        for host in "abcde":
            penalties.failure(host)
            self.clock.advance(0.1)
        self.assertEqual(list(penalties.sources), ["c", "d", "e"])  # the oldest went first
        self.assertEqual(penalties.remaining("a"), 0)

    def test_forgotten_sources_are_trimmed_as_others_fail(self) -> None:
        for host in "abc":
            self.penalties.failure(host)
        self.clock.advance(61)  # a, b, c: penalty over, their one failure forgiven
        self.penalties.failure("d")
        self.assertEqual(list(self.penalties.sources), ["d"])

    def test_step_zero_turns_penalties_off(self) -> None:
        penalties = Penalties(self.clock, step=0)
        self.assertEqual(penalties.failure("a"), 0)
        self.assertEqual(len(penalties), 0)

    def test_refusals_are_reported_at_most_once_an_interval(self) -> None:
        self.penalties.failure("a")
        self.assertEqual(self.penalties.refused("a"), 1)
        self.assertEqual([self.penalties.refused("a") for _ in range(5)], [0] * 5)
        self.clock.advance(1)
        self.assertEqual(self.penalties.refused("a"), 6)  # these and the 5 before
        self.assertEqual(self.penalties.refused("unknown"), 0)


class ExemptTests(unittest.SynchronousTestCase):
    def test_exempt_networks_addresses_and_local(self) -> None:
        penalties = Penalties(Clock(), exempt=["10.0.0.0/8", "192.0.2.7", "2001:db8::/32",
                                               "local"])
        self.assertIsNone(penalties.key("10.1.2.3"))
        self.assertIsNone(penalties.key("::ffff:10.1.2.3"))
        self.assertIsNone(penalties.key("192.0.2.7"))
        self.assertEqual(penalties.key("192.0.2.8"), "192.0.2.8")
        self.assertIsNone(penalties.key("2001:db8:5::1"))
        self.assertEqual(penalties.key("2001:db9::1"), "2001:db9::/64")
        self.assertIsNone(penalties.key(None))
        self.assertIsNone(penalties.key("local"))

    def test_nothing_is_exempt_by_default(self) -> None:
        penalties = Penalties(Clock())
        self.assertEqual(penalties.key("127.0.0.1"), "127.0.0.1")  # not even loopback
        self.assertEqual(penalties.key(None), "local")

    def test_bad_values(self) -> None:
        self.assertEqual(parse_exempt([])[1], False)
        for bad in ("10.0.0.0/33", "nonsense", ""):
            with self.assertRaises(ValueError):
                parse_exempt([bad])
