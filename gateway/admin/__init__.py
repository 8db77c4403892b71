"""The operators' API under ``/admin`` (admin token required)."""
