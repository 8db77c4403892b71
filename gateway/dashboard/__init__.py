"""Operators' dashboard: server-rendered pages over ``gateway.reporting`` (see routes.py)."""
