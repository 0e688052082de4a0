"""One name, one server: a second pvsd started with another's name (a copied configuration)
must not make the peers drop the real server's datagrams as replays and show it down.

`NameClaims` is pure (time given); the `Site` part is fed datagrams by hand, no socket."""

from __future__ import annotations

import dataclasses
import time

from pvs_protocol import coordination as co
from pvsd.config import from_mapping
from pvsd.site import CLAIM_MEMORY, LocalState, NameClaims, Site

WINDOW = 3.0
NOW_MS = 1_800_000_000_000
A, D = ("10.0.0.1", 6910), ("10.0.0.9", 6910)
KEY = b"k" * 32


def beat(name: str, address: str = "") -> co.Heartbeat:
    return co.Heartbeat(name, address, "", co.ServerState.SERVING, 1.0, 0, 0, 0, 1)


class Speaker:
    """One process under a name: its epoch, its next sequence number, where it sends from."""

    def __init__(self, epoch: int, source: tuple[str, int], name: str = "s2") -> None:
        self.epoch, self.source, self.name, self.seq = epoch, source, name, 0

    def envelope(self, at_ms: int = NOW_MS) -> co.Envelope:
        self.seq += 1
        address = f"{self.source[0]}:{self.source[1]}"
        return co.Envelope(self.epoch, self.seq, at_ms, beat(self.name, address))


def say(claims: NameClaims, speaker: Speaker, now: float) -> str:
    """The verdict's drop reason ("" when taken)."""
    at_ms = NOW_MS + int(now * 1000)
    return claims.check(speaker.name, speaker.envelope(at_ms), speaker.source, now, at_ms).reason


def test_a_restart_in_place_is_heard_at_once_and_its_old_process_is_a_replay() -> None:
    claims = NameClaims(WINDOW)
    old, new = Speaker(1, A), Speaker(2, A)
    assert say(claims, old, 0.0) == ""
    assert say(claims, new, 0.5) == ""  # same address, newer start: a restart, not a clash
    assert say(claims, old, 0.6) == "replayed"
    assert say(claims, new, 0.7) == ""


def test_a_restart_with_the_clock_set_back_is_heard_once_the_old_process_is_silent() -> None:
    claims = NameClaims(WINDOW)
    assert say(claims, Speaker(10, A), 0.0) == ""
    set_back = Speaker(5, A)
    assert say(claims, set_back, 1.0) == "replayed"  # the old one may still be talking
    assert say(claims, set_back, WINDOW + 0.5) == ""


def test_a_message_seen_before_is_a_replay() -> None:
    claims = NameClaims(WINDOW)
    speaker = Speaker(1, A)
    envelope = speaker.envelope()
    assert claims.check("s2", envelope, A, 0.0, NOW_MS).accepted
    assert claims.check("s2", envelope, A, 0.1, NOW_MS).reason == "replayed"
    stale = speaker.envelope(NOW_MS - co.MAX_CLOCK_SKEW_MS - 1)
    assert claims.check("s2", stale, A, 0.2, NOW_MS).reason == "stale"


def test_a_second_live_server_under_the_name_is_refused_and_the_first_never_dropped() -> None:
    claims = NameClaims(WINDOW)
    real, copy = Speaker(1, A), Speaker(2, D)
    found = []
    for tick in range(40):  # 20 s of both talking, each every half second
        now = tick * 0.5
        taken = claims.check("s2", real.envelope(NOW_MS), A, now, NOW_MS)
        assert taken.accepted, f"the real server's datagram was dropped at {now}: {taken}"
        refused = claims.check("s2", copy.envelope(NOW_MS), D, now + 0.25, NOW_MS)
        assert refused.reason == "duplicate_name"
        found += [d for d in (taken.duplicate, refused.duplicate) if d is not None]
    assert len(found) == 1, "found once, not at every datagram"
    assert (found[0].kept.epoch, found[0].refused.epoch) == (1, 2)
    assert found[0].kept.source == A and found[0].refused.source == D
    assert [(d.kept.epoch, d.refused.epoch) for d in claims.duplicates()] == [(1, 2)]
    # The copy stops: once silent for the window, the clash is over; the real one goes on.
    now = 20.0 + WINDOW + 1
    assert say(claims, real, now) == ""
    ended = claims.prune(now)
    assert [(d.name, d.refused.epoch) for d in ended] == [("s2", 2)]
    assert claims.duplicates() == []
    assert say(claims, copy, now + 0.1) == "replayed"  # its epoch is remembered, not re-heard


def test_the_older_process_is_kept_even_when_the_newer_was_heard_first() -> None:
    claims = NameClaims(WINDOW)
    copy, real = Speaker(5, D), Speaker(1, A)  # we restarted and heard the copy first
    assert say(claims, copy, 0.0) == ""
    reasons = []
    for tick in range(1, 6):
        reasons.append(say(claims, real, tick * 0.5))
        reasons.append(say(claims, copy, tick * 0.5 + 0.25))
    # Held until both are seen alive; then the older is the server and the copy is refused.
    assert reasons == ["duplicate_name", "", "", "duplicate_name"] + ["", "duplicate_name"] * 3
    duplicate = claims.duplicates()[0]
    assert (duplicate.kept.epoch, duplicate.refused.epoch) == (1, 5)


def test_a_server_restarted_at_another_address_takes_over_once_the_old_one_is_silent() -> None:
    claims = NameClaims(WINDOW)
    before, after = Speaker(1, A), Speaker(2, D)
    assert say(claims, before, 0.0) == ""
    assert say(claims, after, 0.5) == "duplicate_name"  # held: the old one may still talk
    assert say(claims, after, 1.0) == "duplicate_name"
    assert say(claims, after, WINDOW + 0.5) == ""  # the old one went quiet: it moved
    assert say(claims, before, WINDOW + 0.6) == "replayed"
    assert claims.duplicates() == []
    # A move to an address after a long silence is taken at once.
    assert say(claims, Speaker(3, ("10.0.0.7", 6910)), 2 * WINDOW + 10) == ""


def test_silent_names_are_forgotten_once_their_datagrams_are_stale() -> None:
    claims = NameClaims(WINDOW)
    assert say(claims, Speaker(1, A), 0.0) == ""
    claims.prune(CLAIM_MEMORY - 1)
    assert "s2" in claims._names
    claims.prune(CLAIM_MEMORY + 1)
    assert "s2" not in claims._names


# -- the site: our own name from elsewhere ----------------------------------------------------


def make_site(name: str = "s1") -> Site:
    config = dataclasses.replace(
        from_mapping({"name": name, "stores": ["/s"], "peer_timeout": WINDOW}), site_key=KEY
    )
    state = LocalState(co.ServerState.SERVING, 0, 0, {})
    return Site(config, lambda: state, "127.0.0.1:7000")


def datagram(name: str, epoch: int, seq: int, address: str, at_ms: int | None = None) -> bytes:
    stamp = time.time_ns() // 1_000_000 if at_ms is None else at_ms
    return co.encode(co.Envelope(epoch, seq, stamp, beat(name, address)), KEY)


def test_the_later_server_stops_when_it_hears_its_name_from_an_older_one() -> None:
    site = make_site()
    heard: list[str] = []
    site.on_name_conflict.append(heard.append)
    older, after_our_start = site._epoch - 1_000_000_000, site._epoch // 1_000_000 + 100
    # Relayed by a peer (from its address): the other server's own heartbeat, signed by it.
    relayed = datagram("s1", older, 1, "10.0.0.1:6910", after_our_start)
    site.datagram_received(relayed, ("10.0.0.5", 6910))
    assert site.conflict == "10.0.0.1:6910" and heard == ["10.0.0.1:6910"]
    again = datagram("s1", older, 2, "10.0.0.1:6910", after_our_start + 500)
    site.datagram_received(again, ("10.0.0.5", 6910))
    assert heard == ["10.0.0.1:6910"], "told once"
    assert "s1" not in site.peers and site.dropped["own"] == 2


def test_the_first_server_goes_on_when_a_later_one_uses_its_name() -> None:
    site = make_site()
    site.on_name_conflict.append(lambda other: (_ for _ in ()).throw(AssertionError(other)))
    newer = site._epoch + 1_000_000_000
    site.datagram_received(datagram("s1", newer, 1, "10.0.0.9:6910"), ("10.0.0.9", 6910))
    assert site.conflict is None


def test_our_own_datagrams_and_those_of_our_previous_run_are_no_clash() -> None:
    site = make_site()
    site.on_name_conflict.append(lambda other: (_ for _ in ()).throw(AssertionError(other)))
    ours = datagram("s1", site._epoch, 1, "127.0.0.1:7000")
    site.datagram_received(ours, ("127.0.0.1", 7000))  # we are in our own peer list
    before_start = site._epoch // 1_000_000 - 10
    previous = datagram("s1", site._epoch - 5_000_000_000, 9, "127.0.0.1:7000", before_start)
    site.datagram_received(previous, ("127.0.0.1", 7000))  # late, or replayed: sent before we ran
    assert site.conflict is None and site.dropped["own"] == 2


def test_the_site_keeps_the_real_peer_in_its_view_while_a_copy_talks() -> None:
    site = make_site()
    real_epoch, copy_epoch = site._epoch - 10**9, site._epoch + 10**9
    for seq in range(1, 8):
        site.datagram_received(datagram("s2", real_epoch, seq, "10.0.0.2:6910"), A)
        site.datagram_received(datagram("s2", copy_epoch, seq, "10.0.0.9:6910"), D)
        site._check_peers(time.monotonic())
        peer = site.peers["s2"]
        assert peer.up and peer.heartbeat.stream_address == "10.0.0.2:6910"
        assert peer.epoch == real_epoch
    assert site.dropped["duplicate_name"] == 7 and site.dropped["replayed"] == 0
    assert [d.refused.source for d in site.claims.duplicates()] == [D]


def test_forget_removes_a_down_peer_only() -> None:
    site = make_site()
    site.datagram_received(datagram("s2", 1, 1, "10.0.0.2:6910", None), A)
    assert not site.forget("nobody")
    try:
        site.forget("s2")
    except ValueError as error:
        assert "up" in str(error)
    else:
        raise AssertionError("an up peer was forgotten")
    site.peers["s2"].up = False
    assert site.forget("s2") and "s2" not in site.peers
    site.datagram_received(datagram("s2", 1, 2, "10.0.0.2:6910"), A)
    assert site.peers["s2"].up, "it comes back when it speaks again"
