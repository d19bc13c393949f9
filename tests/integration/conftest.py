"""The engine fixtures of the behavioural suite, for the other suites that run on both engines."""

from tests.integration.test_engine_contract import broker, engine

__all__ = ["broker", "engine"]
