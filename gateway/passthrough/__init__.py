"""``/v1/completions`` and ``/v1/embeddings``: forwarded to the route's teacher provider
through litellm and logged with cost, never distilled (the student serves chat only)."""
