"""The one error shape of the HTTP API: a 4xx with {"error": {"code", "message"}} (docs/contract.md §6)."""
from __future__ import annotations


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
