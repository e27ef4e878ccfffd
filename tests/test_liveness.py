"""The lost-peer rule of `dice_jax.liveness` (the 2-process kill test runs the watchdog)."""

from dice_jax.liveness import LOST_AFTER_SECONDS, lost_peers


def test_a_peer_is_lost_when_its_counter_stands_still_unless_it_is_done():
    t = LOST_AFTER_SECONDS
    beats = {1: "7", 2: "done", 3: "12", 4: ""}
    changed = {1: 0.0, 2: 0.0, 3: 50.0, 4: 0.0}
    # 1 stood still past the limit; 2 finished on purpose; 3 beat recently; 4 never beat.
    assert lost_peers(beats, changed, now=50.0 + t / 2) == [1, 4]
    assert lost_peers(beats, changed, now=t) == []
