"""``POST /v1/responses``: OpenAI's Responses API, served through the chat service."""
