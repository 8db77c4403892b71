"""Operators' dashboard: server-rendered pages over ``core.store.reporting`` (see routes.py)."""
