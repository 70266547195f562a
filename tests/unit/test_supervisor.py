"""``pdserve up``'s restart policy and the pieces of the launcher that decide what a child gets
(exact: the clock is passed in, no process is started)."""

from __future__ import annotations

import pytest

from pdserve.launcher import child_env, set_flag
from pdserve.supervisor import RestartPolicy, RestartTracker


def test_backoff_doubles_per_recent_restart_up_to_the_cap_then_gives_up():
    tracker = RestartTracker(
        RestartPolicy(max_restarts=4, window_s=100, backoff_initial_s=1, backoff_max_s=5)
    )
    assert [tracker.on_exit(t) for t in (0.0, 2.0, 5.0, 10.0)] == [1, 2, 4, 5]
    assert tracker.on_exit(20.0) is None  # a fifth exit within the window: give up


def test_restarts_older_than_the_window_are_forgotten():
    tracker = RestartTracker(RestartPolicy(max_restarts=2, window_s=60, backoff_initial_s=0.5))
    assert tracker.on_exit(0.0) == 0.5
    assert tracker.on_exit(10.0) == 1.0
    assert tracker.on_exit(20.0) is None
    # the first restart (at 0.5 s) left the window; one more is allowed, backoff from one recent restart
    assert tracker.on_exit(61.0) == 1.0


def test_zero_restarts_gives_up_at_the_first_exit():
    assert RestartTracker(RestartPolicy(max_restarts=0)).on_exit(0.0) is None


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_restarts": -1}, "max_restarts"),
        ({"window_s": 0}, "restart_window_s"),
        ({"backoff_initial_s": 5, "backoff_max_s": 1}, "backoff"),
    ],
)
def test_bad_policies_are_refused_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        RestartPolicy(**kwargs)


def test_only_the_gateway_gets_the_api_key():
    base = {"PDSERVE_API_KEY": "secret-key", "PATH": "/bin"}
    assert child_env("gateway", base)["PDSERVE_API_KEY"] == "secret-key"
    for name in ("decode-0", "prefill-1"):
        env = child_env(name, base)
        assert "PDSERVE_API_KEY" not in env and env["PATH"] == "/bin"
        assert env["PYTHONUNBUFFERED"] == "1"  # lines reach `up` as they are written


def test_a_restart_reuses_the_port_the_child_first_got():
    argv = ["pdserve", "decode", "--port", "0", "--kv-cache-mib", "32"]
    set_flag(argv, "--port", "41234")
    assert argv == ["pdserve", "decode", "--port", "41234", "--kv-cache-mib", "32"]
