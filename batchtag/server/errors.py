"""The one exception every server stage raises to answer with an API code."""

from __future__ import annotations

from batchtag import codes


class ApiError(Exception):
    """A request the API answers with ``code``; ``detail`` is appended to the table's message.

    Details go back to the caller, so they must never contain secrets or request bodies.
    """

    def __init__(self, code: int, detail: str = "") -> None:
        super().__init__(detail or codes.message(code))
        self.code = code
        self.detail = detail

    @property
    def message(self) -> str:
        return api_message(self.code, self.detail)


def api_message(code: int, detail: str = "") -> str:
    base = codes.message(code)
    return f"{base}: {detail}" if detail else base
