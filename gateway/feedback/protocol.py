"""Wire format of ``POST /v1/feedback``: strict, since it is our API and no SDK sends fields
we do not know (an unknown field is a typo, named in the 400)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

# A chat completion's id is the request id behind this prefix (gateway/chat/shapes.py).
COMPLETION_PREFIX = "chatcmpl-"


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, max_length=128,
                            description="The answer's `x-request-id` header, or a chat completion's `id`.")
    rating: Literal["up", "down"] | None = None
    score: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False, strict=True)
    correction: str | None = Field(None, min_length=1,
                                   description="The right answer: trained on instead of the logged one.")
    comment: str | None = Field(None, max_length=4_000)

    @field_validator("request_id")
    @classmethod
    def _bare_request_id(cls, value: str) -> str:
        return value.strip().removeprefix(COMPLETION_PREFIX)

    @field_validator("correction")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise PydanticCustomError("blank", "must not be blank")
        return value

    @model_validator(mode="after")
    def _says_something(self) -> FeedbackRequest:
        if self.rating is None and self.score is None and self.correction is None:
            raise PydanticCustomError("no_feedback", "give at least one of rating, score or correction")
        return self
