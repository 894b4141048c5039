"""
The OpenAPI 3.1 description of a running configuration: its routes on
ingress, and the admin API. Served at C{GET /_openapi.json} on the admin
endpoint.
"""

from __future__ import annotations

import re
from typing import Any

from .. import __version__
from ..config import Config
from ..uow import FAILED

_PARAMETER = re.compile(r"<(?:(?P<converter>[a-z]+)(?:\([^)]*\))?:)?(?P<name>[A-Za-z_][A-Za-z0-9_]*)>")
_TYPES = {"int": {"type": "integer"}, "float": {"type": "number"}}

ERROR = {
    "type": "object",
    "required": ["error", "message"],
    "properties": {"error": {"type": "string"}, "message": {"type": "string"}},
}
VERDICT = {
    "type": "object",
    "required": ["verdict", "status"],
    "properties": {
        "verdict": {"enum": ["declined", "stored", "failed"]},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
    },
}
REPORT = {
    "type": "object",
    "required": ["uow", "outcome", "stashes"],
    "properties": {
        "uow": {"type": "integer"},
        "outcome": {"enum": ["stored", "rejected", "queued"]},
        "stashes": {"type": "object", "additionalProperties": {"$ref": "#/components/schemas/Verdict"}},
    },
}
PENDING = {
    "type": "object",
    "required": ["uow", "outcome"],
    "properties": {"uow": {"type": "integer"}, "outcome": {"const": "pending"}, "message": {"type": "string"}},
}


def _json(schema: dict[str, Any], description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": schema}}}
    if headers:
        response["headers"] = headers
    return response


def _error(description: str) -> dict[str, Any]:
    return _json({"$ref": "#/components/schemas/Error"}, description)


def _template(path: str) -> tuple[str, list[dict[str, Any]]]:
    parameters = []

    def replace(match: re.Match[str]) -> str:
        name = match["name"]
        schema = _TYPES.get(match["converter"] or "", {"type": "string", "pattern": "^[^/]+$", "minLength": 1})
        parameters.append({"name": name, "in": "path", "required": True, "schema": schema})
        return "{" + name + "}"

    return _PARAMETER.sub(replace, path), parameters


def _ingress(config: Config, secured: bool) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    location = {"Location": {"description": "The UOW on the admin API", "schema": {"type": "string"}}}
    retry = {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "string"}}}
    common = {
        "400": _error("Bad key, bad Idempotency-Key, or a malformed body a stash refused"),
        "404": _error("No route matches, or nothing is stored under the key"),
        "405": _error("Method not allowed on this route"),
    }
    if secured:
        common["401"] = _error("A valid bearer token is required")
    for route in config.routes:
        template, parameters = _template(route.path)
        mutation = {
            "parameters": [
                *parameters,
                {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string", "pattern": "^[!-~]{1,255}$"},
                },
            ],
            "requestBody": {
                "required": False,
                "content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                    "application/json": {"schema": {}},
                },
            },
            "responses": {
                "200": _json({"$ref": "#/components/schemas/Report"}, "Stored in every stash of the route"),
                **common,
                "202": _json({"$ref": "#/components/schemas/Pending"}, "On the shared spool: still under way after limits.request_timeout_s", location),
                "409": _json({"oneOf": [{"$ref": "#/components/schemas/Report"}, {"$ref": "#/components/schemas/Error"}]}, "A stash rejected it, or the first request with this Idempotency-Key is in flight"),
                "410": _error("The request with this Idempotency-Key was dropped by an operator"),
                "413": _error("The body exceeds limits.max_body_bytes"),
                "422": _json({"oneOf": [{"$ref": "#/components/schemas/Report"}, {"$ref": "#/components/schemas/Error"}]}, "A stash rejected it, or the Idempotency-Key was used for another request"),
                "4XX": _json({"$ref": "#/components/schemas/Report"}, "Rejected by a stash: rolled back everywhere, not retried"),
                "500": _json({"oneOf": [{"$ref": "#/components/schemas/Report"}, {"$ref": "#/components/schemas/Error"}, {"$ref": "#/components/schemas/Pending"}]}, "A stash's 500 (queued), or the spool could not be written"),
                "503": _json(
                    {"oneOf": [{"$ref": "#/components/schemas/Report"}, {"$ref": "#/components/schemas/Error"}]},
                    "A stash's 503 (queued, see Location), or busy / disk full (see Retry-After)",
                    {**location, **retry},
                ),
                "504": _json({"oneOf": [{"$ref": "#/components/schemas/Report"}, {"$ref": "#/components/schemas/Pending"}]}, "A stash timed out (queued), or still under way after limits.request_timeout_s", location),
                "5XX": _json({"$ref": "#/components/schemas/Report"}, "A stash failed: rolled back everywhere and queued for retry", location),
            },
        }
        item: dict[str, Any] = {
            method: {**mutation, "operationId": f"{method}:{route.path}", "summary": f"{method.upper()} a document ({', '.join(route.stashes)})"}
            for method in ("put", "post", "patch", "delete")
        }
        if route.read:
            read = {
                "parameters": parameters,
                "responses": {
                    "200": {"description": "The stored document", "content": {"*/*": {"schema": {}}}},
                    **common,
                },
            }
            item["get"] = {**read, "operationId": f"get:{route.path}", "summary": f"Read from {', '.join(route.read)}"}
            item["head"] = {**read, "operationId": f"head:{route.path}"}
        paths[template] = item
    return paths


def _admin(secured: bool) -> dict[str, Any]:
    uowId = [{"name": "uowId", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 0}}]
    anyObject = {"type": "object"}
    notFound = _error("No such UOW here")
    common = {"401": _error("A valid bearer token is required")} if secured else {}
    return {
        "/": {"get": {"operationId": "page", "responses": {"200": {"description": "The fail-queue page", "content": {"text/html": {"schema": {"type": "string"}}}}}}},
        "/_health": {"get": {"operationId": "health", "responses": {"200": _json(anyObject, "Alive, with counts and alarms"), **common}}},
        "/_ready": {"get": {"operationId": "ready", "responses": {"200": _json(anyObject, "Ready"), "503": _json(anyObject, "Not ready, with the reasons"), **common}}},
        "/metrics": {"get": {"operationId": "metrics", "responses": {"200": {"description": "Prometheus metrics", "content": {"text/plain": {"schema": {"type": "string"}}}}, **common}}},
        "/_openapi.json": {"get": {"operationId": "openapi", "responses": {"200": _json(anyObject, "This document"), **common}}},
        "/_uow/{uowId}": {"get": {"operationId": "uow", "parameters": uowId, "responses": {"200": _json(anyObject, "The UOW's state and report"), "404": notFound, **common}}},
        "/_failed": {
            "get": {
                "operationId": "failed",
                "parameters": [{"name": "state", "in": "query", "required": False, "schema": {"enum": [s.value for s in FAILED]}}],
                "responses": {"200": _json(anyObject, "The fail queue, oldest first"), "400": _error("Unknown state"), **common},
            }
        },
        "/_failed/{uowId}/retry": {
            "post": {"operationId": "retry", "parameters": uowId, "responses": {"200": _json(anyObject, "The outcome of the attempt"), "404": notFound, "409": _error("Already being retried"), **common}}
        },
        "/_failed/{uowId}": {
            "delete": {"operationId": "drop", "parameters": uowId, "responses": {"200": _json(anyObject, "Dropped"), "404": notFound, "409": _error("Being retried"), **common}}
        },
        "/_reload": {
            "post": {"operationId": "reload", "responses": {"200": _json(anyObject, "The new configuration is in force"), "400": _error("The new configuration is wrong; the old one stays"), **common}}
        },
    }


def describe(config: Config, ingressSecured: bool = False, adminSecured: bool = False) -> dict[str, Any]:
    """
    The OpenAPI 3.1 document of C{config}: ingress paths first, then the
    admin API's (served on C{admin_listen}).
    """
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "api-container",
            "version": __version__,
            "description": "One HTTP write, delivered to every configured store or to none. Paths starting with /_ and /metrics are served on the admin endpoint.",
        },
        "paths": {**_ingress(config, ingressSecured), **_admin(adminSecured)},
        "components": {
            "schemas": {"Error": ERROR, "Verdict": VERDICT, "Report": REPORT, "Pending": PENDING},
        },
    }
    if ingressSecured or adminSecured:
        document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        document["security"] = [{"bearer": []}]
    return document
