"""The route's teacher provider for legacy completions and embeddings, through litellm.

Same endpoint, key, timeout, retries and fallback as the teacher's chat calls
(:class:`LiteLLMTeacher`); embeddings go to the route's ``teacher.embedding_model``.
"""

from __future__ import annotations

import time
from typing import Any

from core.upstream import Completion
from gateway.upstream.teacher import LiteLLMTeacher

# Legacy completions parameters litellm takes by name; anything else goes in extra_body.
COMPLETION_PARAMS = {"max_tokens", "temperature", "top_p", "n", "stop", "echo", "logprobs", "suffix", "best_of",
                     "seed", "user", "presence_penalty", "frequency_penalty", "logit_bias"}


def _split(body: dict[str, Any], named: set[str], own: tuple[str, ...]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    extra_body = {key: value for key, value in body.items() if key not in named and key not in own}
    kwargs.update({key: value for key, value in body.items() if key in named})
    if extra_body:
        kwargs["extra_body"] = extra_body
    return kwargs


class ProviderPassthrough(LiteLLMTeacher):
    async def text_completion(self, body: dict[str, Any]) -> Completion:
        started = time.perf_counter()
        params = _split(body, COMPLETION_PARAMS, ("model", "prompt", "stream"))
        response, model = await self._retrying(lambda model: self._litellm.atext_completion(
            prompt=body["prompt"], **params, **self._endpoint_kwargs(model)))
        data = response.model_dump()
        usage = data.get("usage") or {}
        prompt_tokens, completion_tokens = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        return Completion(data, prompt_tokens, completion_tokens, self.cost(prompt_tokens, completion_tokens, model),
                          (time.perf_counter() - started) * 1000, model)

    async def embedding(self, body: dict[str, Any]) -> Completion:
        """Float vectors (the gateway encodes base64 itself when the client asks for it)."""
        assert self.config.embedding_model is not None
        started = time.perf_counter()
        params = _split(body, {"dimensions", "user"}, ("model", "input", "encoding_format"))
        response, model = await self._retrying(lambda model: self._litellm.aembedding(
            input=body["input"], **params, **self._endpoint_kwargs(model)), models=[self.config.embedding_model])
        data = response.model_dump()
        prompt_tokens = int((data.get("usage") or {}).get("prompt_tokens") or 0)
        return Completion(data, prompt_tokens, 0, self.embedding_cost(prompt_tokens, model),
                          (time.perf_counter() - started) * 1000, model)

    def embedding_cost(self, prompt_tokens: int, model: str) -> float:
        """The route's embedding price, else litellm's for ``model`` (chat prices do not apply)."""
        if self.config.embedding_input_per_mtok is not None:
            return prompt_tokens * self.config.embedding_input_per_mtok / 1_000_000
        try:
            prompt_cost, _ = self._litellm.cost_per_token(model=model, prompt_tokens=prompt_tokens, completion_tokens=0)
        except Exception:  # noqa: BLE001 - litellm raises a bare Exception for a model missing from its map
            return 0.0
        return float(prompt_cost)
