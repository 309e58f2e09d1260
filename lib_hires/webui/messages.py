"""How the extension talks back: console lines, and errors that reach the API caller as HTTP 422."""
from __future__ import annotations

from fastapi import HTTPException

from lib_hires.settings import TITLE


class RequestError(HTTPException):
    """A request the extension cannot serve; the API answers 422 with this message.

    Raised from the replaced ``p.sample``: the WebUI swallows exceptions raised in Script hooks, but
    not this one, and its API error handler uses the exception's ``status_code``. The UI shows the text.
    """

    def __init__(self, message: str):
        super().__init__(status_code=422, detail=message)

    def __str__(self) -> str:
        return str(self.detail)


def log(message: str) -> None:
    print(f"[{TITLE}] {message}")
