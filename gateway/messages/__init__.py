"""``POST /v1/messages``: Anthropic's Messages API, served through the chat service."""
