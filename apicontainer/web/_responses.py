"""
JSON responses, the only kind the server sends.
"""

from __future__ import annotations

from typing import Any

from twisted.web.iweb import IRequest

from .._compactjson import compact


def jsonResponse(request: IRequest, status: int, body: Any, **headers: str) -> bytes:
    """
    Set C{status} and C{headers} on C{request} and return C{body} as JSON.
    """
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    for name, value in headers.items():
        request.setHeader(name.replace("_", "-").encode("ascii"), value.encode("latin-1"))
    return compact(body).encode("utf-8") + b"\n"


def errorResponse(request: IRequest, status: int, error: str, message: str, **headers: str) -> bytes:
    """
    A JSON error: C{{"error": code, "message": text}}.
    """
    return jsonResponse(request, status, {"error": error, "message": message}, **headers)
