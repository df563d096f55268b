"""The pool's I/O-free core: placement, affinity, leases, arguments. No processes."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor import AsyncWorkerPool, InvalidArgument, WorkerPool
from supervisor.placement import (
    DEVICE_ENV,
    MAX_MEMBERS,
    Placement,
    estimate_tokens,
    member_count,
    member_envs,
    text_chars,
    worker_options,
)
from tests.supervisor.conftest import MOCK

pytestmark = pytest.mark.timeout(60)


def test_least_loaded_then_tokens_then_index() -> None:
    p = Placement(3)
    a = p.place(None, 10)
    b = p.place(None, 10)
    assert (a.member, b.member) == (0, 1)
    c = p.place(None, 5)
    assert c.member == 2
    d = p.place(None, 1)  # all hold one request: fewest tokens wins
    assert d.member == 2
    a.release()
    assert p.place(None, 100).member == 0
    assert [p.outstanding(i) for i in range(3)] == [1, 1, 2]
    assert p.tokens_in_flight(2) == 6


def test_affinity_sticks_and_falls_back_when_the_member_is_gone() -> None:
    p = Placement(2)
    first = p.place("conv", 50)
    assert first.member == 0
    # member 0 is busier, but the conversation stays there
    assert p.place("conv", 50).member == 0
    assert p.place(None, 1).member == 1
    assert p.affinity("conv") == 0
    # member 0 is dead: least loaded among the usable, and the key moves
    moved = p.place("conv", 1, usable={1})
    assert moved.member == 1 and p.affinity("conv") == 1
    # nobody usable: every member is a candidate (the member raises its error)
    assert p.place("other", 1, usable=set()).member in (0, 1)


def test_affinity_is_a_bounded_lru() -> None:
    p = Placement(2, affinity_keys=2)
    p.place("a", 1)
    p.place("b", 1)
    p.place("a", 1)  # a is now the most recent
    p.place("c", 1)
    assert p.affinity("b") is None
    assert p.affinity("a") is not None and p.affinity("c") is not None
    assert Placement(2, affinity_keys=0).place("k", 1).member == 0


def test_release_is_idempotent() -> None:
    p = Placement(1)
    lease = p.place(None, 7)
    lease.release()
    lease.release()
    assert (p.outstanding(0), p.tokens_in_flight(0)) == (0, 0)


@settings(max_examples=200, deadline=None)
@given(
    members=st.integers(1, 6),
    ops=st.lists(
        st.tuples(st.sampled_from([None, "x", "y", "z"]), st.integers(0, 1000), st.booleans()),
        max_size=60,
    ),
)
def test_counts_balance_and_placement_is_least_loaded(
    members: int, ops: list[tuple[str | None, int, bool]]
) -> None:
    p = Placement(members)
    held = []
    for key, tokens, release_one in ops:
        before = [(p.outstanding(i), p.tokens_in_flight(i), i) for i in range(members)]
        known = p.affinity(key) if key is not None else None
        lease = p.place(key, tokens)
        if known is not None:
            assert lease.member == known
        else:
            assert before[lease.member] == min(before)
        held.append(lease)
        if release_one and held:
            held.pop(0).release()
        assert all(p.outstanding(i) >= 0 for i in range(members))
    for lease in held:
        lease.release()
    assert all(p.outstanding(i) == 0 and p.tokens_in_flight(i) == 0 for i in range(members))


def test_estimates() -> None:
    assert estimate_tokens(400, 10) == 110
    assert estimate_tokens(3, None) == 256  # the worker's default max_tokens
    assert estimate_tokens(0, True) == 256 and estimate_tokens(-5, -1) == 256
    assert (
        text_chars([{"role": "user", "content": [{"type": "text", "text": "abc"}]}]) == 11
    )  # user, text, abc
    assert text_chars(object()) == 0


def test_shape_and_envs() -> None:
    assert member_count(3, None) == (3, None)
    assert member_count(None, [0, "1"]) == (2, ("0", "1"))
    assert member_count(4, [0, 1]) == (4, ("0", "1"))
    envs = member_envs(3, ("0", "1"), {"A": "b"})
    assert envs == [
        {"A": "b", DEVICE_ENV: "0"},
        {"A": "b", DEVICE_ENV: "1"},
        {"A": "b", DEVICE_ENV: "0"},
    ]
    assert member_envs(2, None, None) == [None, None]


BAD_SHAPES: list[tuple[dict[str, Any], str]] = [
    ({}, "members"),
    ({"members": 0}, "members"),
    ({"members": -3}, "members"),
    ({"members": MAX_MEMBERS + 1}, "members"),
    ({"members": 10**100}, "members"),
    ({"members": 2.0}, "members"),
    ({"members": "2"}, "members"),
    ({"members": True}, "members"),
    ({"devices": []}, "devices"),
    ({"devices": "0,1"}, "devices"),
    ({"devices": b"01"}, "devices"),
    ({"devices": 3}, "devices"),
    ({"devices": {0, 1}}, "devices"),
    ({"devices": [""]}, "devices[0]"),
    ({"devices": [0, "a\0b"]}, "devices[1]"),
    ({"devices": [" 0"]}, "devices[0]"),
    ({"devices": ["0\n"]}, "devices[0]"),
    ({"devices": [-1]}, "devices[0]"),
    ({"devices": [2**40]}, "devices[0]"),
    ({"devices": [True]}, "devices[0]"),
    ({"devices": [0.5]}, "devices[0]"),
    ({"devices": [None]}, "devices[0]"),
    ({"devices": list(range(MAX_MEMBERS + 1))}, "devices"),
    ({"members": 2, "env": "A=b"}, "env"),
    ({"devices": [0], "env": {DEVICE_ENV: "3"}}, "env"),
    ({"members": 1, "no_such_option": 1}, "no_such_option"),
    ({"members": 1, "model": 7}, "path"),
    ({"members": 1, "start_timeout": -1}, "start_timeout"),
    ({"members": 1, "env": {"A": "b\0"}}, "env"),
]


@pytest.mark.parametrize(("kwargs", "name"), BAD_SHAPES)
def test_hostile_constructor_arguments_name_the_argument(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(InvalidArgument, match=f"^invalid_request: {re.escape(name)}"):
        WorkerPool(MOCK, **kwargs)
    with pytest.raises(InvalidArgument, match=f"^invalid_request: {re.escape(name)}"):
        AsyncWorkerPool(MOCK, **kwargs)


@settings(max_examples=100, deadline=None)
@given(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(), st.binary()))
def test_any_members_value_is_checked(value: object) -> None:
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_MEMBERS:
        assert member_count(value, None) == (value, None)
        return
    with pytest.raises(InvalidArgument, match="^invalid_request: members"):
        member_count(value, None)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.one_of(st.integers(), st.text(max_size=8), st.none(), st.booleans()), max_size=4)
)
def test_any_devices_value_is_checked(devices: list[object]) -> None:
    try:
        count, ids = member_count(None, devices)
    except InvalidArgument as exc:
        assert str(exc).startswith("invalid_request: devices")
        return
    assert ids is not None and count == len(devices) >= 1
    assert all(i and "\0" not in i and i == i.strip() for i in ids)


def test_worker_options_refuse_unknown_names() -> None:
    assert worker_options({"restart": None}) == {"restart": None}
    with pytest.raises(InvalidArgument, match="^invalid_request: command"):
        worker_options({"command": ["x"]})


def test_the_pool_names_are_exported() -> None:
    import supervisor

    for name in ("WorkerPool", "AsyncWorkerPool", "PoolStats", "MemberStats"):
        assert name in supervisor.__all__ and hasattr(supervisor, name)
