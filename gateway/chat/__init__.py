"""``POST /v1/chat/completions``: wire format, service and route module."""
