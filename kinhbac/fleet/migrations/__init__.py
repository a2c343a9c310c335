"""Alembic migrations of the fleet schema; shipped in the package so an install can run them."""
