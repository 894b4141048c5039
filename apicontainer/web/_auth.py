"""
Bearer tokens, kept hashed, compared in constant time.

The tokens file holds one C{sha256:<hex digest>} a line; blank lines and
lines starting with C{#} are ignored. Make a line with::

    printf %s "$TOKEN" | sha256sum | sed 's/^/sha256:/; s/ .*//'
"""

from __future__ import annotations

import hashlib
import hmac
import re
from pathlib import Path

from ..config import ConfigError

_LINE = re.compile(r"^sha256:([0-9a-f]{64})$")


class BearerTokens:
    """
    The set of accepted bearer tokens, by their SHA-256 digests.
    """

    def __init__(self, digests: list[bytes]) -> None:
        self._digests = digests

    @classmethod
    def fromFile(cls, path: Path) -> BearerTokens:
        """
        Read a tokens file.

        @raise ConfigError: The file is unreadable, empty or has a bad line.
        """
        try:
            lines = path.read_text("utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"auth.tokens_file: cannot read {path}: {e}") from None
        digests = []
        for number, line in enumerate(lines, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            match = _LINE.match(line)
            if match is None:
                raise ConfigError(
                    f"{path}:{number}: auth.tokens_file: expected 'sha256:' and 64 hex digits"
                )
            digests.append(bytes.fromhex(match[1]))
        if not digests:
            raise ConfigError(f"{path}: auth.tokens_file: no tokens in the file")
        return cls(digests)

    def accepts(self, authorization: bytes | None) -> bool:
        """
        Whether an C{Authorization} header value carries an accepted token.
        """
        if authorization is None:
            return False
        scheme, _, token = authorization.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return False
        presented = hashlib.sha256(token.strip()).digest()
        accepted = False
        for digest in self._digests:
            accepted |= hmac.compare_digest(presented, digest)
        return accepted
