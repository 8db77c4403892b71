"""The student backend: plain httpx to vLLM's OpenAI-compatible server.

No SDK on this path: it serves most traffic, and a bare POST costs a fraction of an SDK
call. The adapter name (``route@version``) is the ``model`` field.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx

from core.upstream import Completion, UpstreamFailure
from gateway.upstream.openai_wire import parse_completion, parse_sse_line

# Per message, what a chat template may add around the content (role markers, separators),
# and once per prompt (the system prompt's frame, the generation prompt); in tokens.
TEMPLATE_TOKENS_PER_MESSAGE = 32
TEMPLATE_TOKENS_PER_PROMPT = 64


class VLLMStudent:
    def __init__(self, base_url: str, *, transport: httpx.AsyncBaseTransport | None = None,
                 max_connections: int = 256, max_model_len: int | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.max_model_len = max_model_len
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            transport=transport,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            timeout=httpx.Timeout(30.0),
        )

    @property
    def http_client(self) -> httpx.AsyncClient:
        """The client every call goes through (tracing instruments it)."""
        return self._client

    async def chat(self, model: str, body: dict[str, Any], timeout_s: float) -> Completion:
        started = time.perf_counter()
        payload = {**body, "model": model, "stream": False}
        try:
            response = await self._client.post("/v1/chat/completions", json=payload, timeout=timeout_s)
        except httpx.PoolTimeout as error:
            raise _pool_full(error) from error
        except httpx.TimeoutException as error:
            raise UpstreamFailure(f"student timed out: {error!r}", timeout=True, retryable=True) from error
        except httpx.ConnectError as error:
            raise UpstreamFailure(f"student unreachable: {error!r}", retryable=True, unreached=True) from error
        except httpx.HTTPError as error:
            raise UpstreamFailure(f"student unreachable: {error!r}", retryable=True) from error
        if response.status_code != 200:
            raise UpstreamFailure(
                f"student answered {response.status_code}: {response.text[:300]}",
                status_code=response.status_code,
                retryable=True,
            )
        data = parse_completion(response, "student")
        usage = data.get("usage") or {}
        return Completion(
            body=data,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            cost_usd=0.0,
            latency_ms=(time.perf_counter() - started) * 1000,
            model=model,
        )

    async def stream(self, model: str, body: dict[str, Any], timeout_s: float) -> AsyncIterator[dict[str, Any]]:
        payload = {**body, "model": model, "stream": True}
        try:
            async with self._client.stream("POST", "/v1/chat/completions", json=payload, timeout=timeout_s) as response:
                if response.status_code != 200:
                    detail = (await response.aread()).decode(errors="replace")[:300]
                    raise UpstreamFailure(
                        f"student answered {response.status_code}: {detail}", status_code=response.status_code,
                        retryable=True,
                    )
                async for line in response.aiter_lines():
                    chunk = parse_sse_line(line, "student")
                    if chunk is not None:
                        yield chunk
        except httpx.PoolTimeout as error:
            raise _pool_full(error) from error
        except httpx.TimeoutException as error:
            raise UpstreamFailure(f"student timed out: {error!r}", timeout=True, retryable=True) from error
        except httpx.ConnectError as error:
            raise UpstreamFailure(f"student unreachable: {error!r}", retryable=True, unreached=True) from error
        except httpx.HTTPError as error:
            raise UpstreamFailure(f"student stream failed: {error!r}", retryable=True) from error

    async def fits_context(self, model: str, body: dict[str, Any]) -> bool:
        """Whether prompt plus requested completion fit the server's ``max_model_len``.

        A request that cannot fit is the client's, not the server's, problem: it goes to the
        teacher without a student call. Cheap for the usual short prompt: a token covers at
        least one byte, so the bytes bound the tokens; only a prompt near the limit is counted
        exactly with vLLM's ``/tokenize``. When that count fails, the student is tried (its
        400 does not count against the breaker).
        """
        if self.max_model_len is None:
            return True
        messages = body.get("messages") or []
        wanted = body.get("max_completion_tokens") or body.get("max_tokens") or 1
        bound = (len(json.dumps(messages, ensure_ascii=False).encode()) + TEMPLATE_TOKENS_PER_PROMPT
                 + TEMPLATE_TOKENS_PER_MESSAGE * len(messages))
        if bound + wanted <= self.max_model_len:
            return True
        count = await self._count_prompt_tokens(model, messages)
        return count is None or count + wanted <= self.max_model_len

    async def _count_prompt_tokens(self, model: str, messages: list[Any]) -> int | None:
        payload = {"model": model, "messages": messages, "add_generation_prompt": True}
        try:
            response = await self._client.post("/tokenize", json=payload, timeout=5.0)
            count = response.json().get("count") if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError, AttributeError):
            return None
        return count if isinstance(count, int) else None

    async def healthy(self) -> bool:
        try:
            response = await self._client.get("/health", timeout=2.0)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def load_adapter(self, name: str, path: str) -> None:
        await self._admin("/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})

    async def unload_adapter(self, name: str) -> None:
        await self._admin("/v1/unload_lora_adapter", {"lora_name": name})

    async def _admin(self, path: str, payload: dict[str, str]) -> None:
        try:
            response = await self._client.post(path, json=payload, timeout=120.0)
        except httpx.HTTPError as error:
            raise UpstreamFailure(f"vLLM {path} failed: {error!r}") from error
        if response.status_code != 200:
            raise UpstreamFailure(f"vLLM {path} answered {response.status_code}: {response.text[:300]}",
                                  status_code=response.status_code)

    async def aclose(self) -> None:
        await self._client.aclose()


def _pool_full(error: httpx.PoolTimeout) -> UpstreamFailure:
    """The gateway's own connection pool is exhausted: not the student server's fault."""
    return UpstreamFailure(f"student connection pool exhausted: {error!r}", timeout=True, retryable=True,
                           server_fault=False)
