"""Shared test fixtures live in tests/fixtures_*.py, one file per area, loaded here."""

pytest_plugins = ["tests.fixtures_etcd", "tests.fixtures_net", "tests.fixtures_engine"]
