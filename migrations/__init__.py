"""Alembic scripts, shipped as ``keyd.migrations`` (see setup.py); run by keyd.store."""
