"""The one error type the Serve deployments raise for bad requests: an HTTP status and a helpful message."""

from __future__ import annotations

from cman.data.errors import scrub_reprs as scrub  # no object reprs in what a client reads


class RequestError(Exception):
    """A client error (4xx): `message` says what went wrong and what to send instead."""

    def __init__(self, status: int, message: str) -> None:
        message = scrub(message)
        super().__init__(status, message)
        self.status = status
        self.message = message

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict[str, object]:
        return {"status": self.status, "error": self.message}


def raise_if_error(result: object) -> None:
    """Encoder replicas return `{"error", "status"}` for a bad item of a batch (a batch cannot fail per item)."""
    if isinstance(result, dict) and "error" in result:
        raise RequestError(int(result.get("status", 400)), str(result["error"]))
