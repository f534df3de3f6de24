"""Fixtures of the fault-injection suite: a private local stack per test module
(:class:`testing.faults.PrivateStack`, never the shared session stack other tests use), and
the ``faults`` and ``e2e`` markers on every test of this folder (``pytest -m faults``,
``make test-faults``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from testing.faults import FaultError, PrivateStack, note

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def private_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateStack]:
    """tansu, influxd and secantusd-py of this module's own, on free ports, data under a
    temporary directory; stopped after the module."""
    with PrivateStack(tmp_path_factory.mktemp("faults")) as stack:
        yield stack


@pytest.fixture
def fault_stack(private_stack: PrivateStack) -> Iterator[PrivateStack]:
    """:func:`private_stack`, every service running and healthy at the start of the test
    (a service a previous test left paused is resumed, one left down is started again)."""
    for svc in private_stack.services.values():
        try:
            svc.resume()
        except FaultError:
            note(f"{svc.name} found down before the test: starting it")
            svc.start()
        if not svc.healthy(timeout=5.0):
            pytest.fail(f"{svc.name} of the private stack is not healthy")
    yield private_stack


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test under tests/faults/ ``faults`` and ``e2e`` (it needs real services)."""
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.faults)
            item.add_marker(pytest.mark.e2e)
