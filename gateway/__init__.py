"""distillgate's HTTP surface: the OpenAI-compatible API, admin API, metrics and the store."""
