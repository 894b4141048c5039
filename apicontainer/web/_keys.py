"""
Resource keys: the request path, decoded and checked.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_to_bytes

MAX_KEY_BYTES = 1024
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")


class BadKey(ValueError):
    """
    The request path cannot be a resource key; the message says why.
    """


def keyFromPath(rawPath: bytes) -> str:
    """
    Decode a request path (without its query) into a resource key.

    Each segment is percent-decoded on its own and must then be UTF-8 text
    with no control character, no C{/}, and not be empty, C{.} or C{..}.

    @raise BadKey: The path is not an acceptable key.
    """
    if not rawPath.startswith(b"/"):
        raise BadKey("the path must start with '/'")
    segments = []
    for raw in rawPath[1:].split(b"/"):
        segment = unquote_to_bytes(raw)
        if segment in (b"", b".", b".."):
            raise BadKey("the path has an empty, '.' or '..' segment")
        if b"/" in segment:
            raise BadKey("the path has an encoded '/' in a segment")
        if _CONTROL.search(segment):
            raise BadKey("the path has a control character (NUL, CR, LF, ...)")
        try:
            segments.append(segment.decode("utf-8"))
        except UnicodeDecodeError:
            raise BadKey("the path is not UTF-8 once percent-decoded") from None
    key = "/" + "/".join(segments)
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise BadKey(f"the path is longer than {MAX_KEY_BYTES} bytes")
    return key
