"""Hidden Model: the tenant-aware core (settings, database, auth primitives, API)."""

__version__ = "0.1.0"
