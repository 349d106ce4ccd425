"""Typed errors with stable codes, shared by the CLI, the HTTP API and the evaluator."""

from __future__ import annotations


class CrfiqaError(Exception):
    """Base error: ``code`` is stable and machine-readable, ``message`` is for people."""

    code = "error"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, str]:
        """Return the JSON form used in results: ``{"code", "message"}``."""
        return {"code": self.code, "message": self.message}


class DecodeError(CrfiqaError):
    """An input could not be decoded into an image (bad bytes, unsupported format, truncated)."""

    code = "decode_error"


class LimitError(CrfiqaError):
    """An input exceeds a configured limit (bytes, pixels, count)."""

    code = "limit_exceeded"


class ModelError(CrfiqaError):
    """A model is unknown, missing, fails its checksum or does not fit its declared contract."""

    code = "model_error"


class InferenceError(CrfiqaError):
    """A model failed while running on valid input."""

    code = "inference_error"
