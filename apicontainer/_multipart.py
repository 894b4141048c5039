"""
Pick named parts out of C{multipart/form-data} bodies.
"""

from __future__ import annotations

from email.message import Message
from email.parser import BytesParser
from email.policy import HTTP

from attrs import frozen


class MultipartError(ValueError):
    """
    The body claims to be C{multipart/form-data} but cannot be parsed as such.
    """


@frozen
class Part:
    """
    One part of a form.
    """

    name: str
    body: bytes
    contentType: str | None
    filename: str | None


def isMultipart(contentType: str | None) -> bool:
    """
    Whether C{contentType} names C{multipart/form-data}.
    """
    if not contentType:
        return False
    return contentType.split(";", 1)[0].strip().lower() == "multipart/form-data"


def findPart(contentType: str | None, body: bytes, name: str) -> Part | None:
    """
    Find the form part called C{name}.

    @return: The part, or L{None} when the body is not multipart or has no
        part of that name.
    @raise MultipartError: The body is multipart but malformed.
    """
    if not isMultipart(contentType):
        return None
    header = f"Content-Type: {contentType}\r\nMIME-Version: 1.0\r\n\r\n".encode(
        "latin-1", "replace"
    )
    message = BytesParser(policy=HTTP).parsebytes(header + body)
    if not message.is_multipart() or message.defects:
        raise MultipartError("malformed multipart/form-data body")
    for sub in message.iter_parts():
        assert isinstance(sub, Message)
        if sub.get_param("name", header="content-disposition") == name:
            payload = sub.get_payload(decode=True)
            if not isinstance(payload, bytes):
                raise MultipartError(f"part {name!r} has no body")
            return Part(
                name=name,
                body=payload,
                contentType=sub.get_content_type() if sub["content-type"] else None,
                filename=sub.get_filename(),
            )
    return None
