"""The two upstreams: the self-hosted student (vLLM over httpx) and the teacher (litellm)."""
