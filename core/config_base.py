"""What every config model shares: the strict base, prices, the error type, name patterns."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field

# The replay teacher's model id: a route naming it with no api_base talks to the launched one.
REPLAY_TEACHER_MODEL = "openai/replay-teacher"
ROUTE_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ConfigError(Exception):
    """The configuration file is missing, unreadable or invalid."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Prices(StrictModel):
    """Dollars per million tokens. Unset teacher prices fall back to litellm's cost map."""

    input_per_mtok: float = Field(ge=0)
    output_per_mtok: float = Field(ge=0)

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_per_mtok + completion_tokens * self.output_per_mtok) / 1e6
