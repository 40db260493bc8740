"""The API's errors: each says which field was wrong and how to fix it, in FastAPI's 422 shape."""

from __future__ import annotations

from typing import Any


class Unsupported(ValueError):
    """A request field stablepipe cannot honour (or a value out of range): answered 422 naming the field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message

    def detail(self) -> list[dict[str, Any]]:
        """FastAPI's validation-error shape, so clients read one format for every 422."""
        return [{"loc": ["body", *self.field.split(".")], "msg": self.message, "type": "value_error"}]
