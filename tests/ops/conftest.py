"""Fixtures for the operations tests: the broker factories of the service tests (produce, read_topic)."""

from tests.service.conftest import produce, read_topic  # noqa: F401 (re-exported as fixtures)
