"""
The HTTP side: ingress (the writes and reads of the routes), the admin API
and the fail-queue page, the connection and header limits, bearer tokens,
and the OpenAPI description.
"""

from ._admin import AdminAPI
from ._auth import BearerTokens
from ._ingress import Ingress
from ._limits import LimitedSite

__all__ = ["AdminAPI", "BearerTokens", "Ingress", "LimitedSite"]
