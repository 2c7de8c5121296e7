"""The example's tests use the project's test database fixtures.

``database_url`` is a fresh database migrated with outbox's migrations (on the
PostgreSQL the test suite finds: configured, local, or embedded); the trading
tables are created on top of it, as a host application's own migrations would.
"""

from tests.conftest import database_url, pg_server, template_database

__all__ = ["database_url", "pg_server", "template_database"]
