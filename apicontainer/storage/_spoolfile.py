"""
The spool file's frame: one UOW per file, C{spool/<uow id>.uow}, in a frame
that makes a torn or corrupt file detectable::

    magic     8 bytes   b"ACSPOOL1"
    lengths  12 bytes   big-endian uint32 metadata length, uint64 body length
    metadata  n bytes   UTF-8 JSON: uow, method, key, route, content type, ...
    body      m bytes   the request body, as received
    checksum  4 bytes   big-endian CRC-32 of everything before it
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path
from typing import IO, Iterator

from .._compactjson import compact
from ..uow import CHUNK_BYTES, INLINE_BODY_BYTES, SpooledBody, UnitOfWork

MAGIC = b"ACSPOOL1"



_LENGTHS = struct.Struct(">IQ")



_CHECKSUM = struct.Struct(">I")



_MAX_METADATA = 1 << 20



SUFFIX = ".uow"



def fileName(uowId: int) -> str:
    """
    The name of UOW C{uowId}'s spool file, inside the spool directory.
    """
    return f"{uowId:020d}{SUFFIX}"



class CorruptSpoolFile(Exception):
    """
    A spool file is torn or corrupt and must not be replayed.
    """



def encodeHead(uow: UnitOfWork) -> bytes:
    metadata = compact(
        {
            "uow": uow.id,
            "method": uow.method,
            "key": uow.key,
            "route": uow.route,
            "content_type": uow.contentType,
            "received_at": uow.receivedAt,
            "idempotency_key": uow.idempotencyKey,
        }
    ).encode("utf-8")
    return MAGIC + _LENGTHS.pack(len(metadata), uow.bodyLength) + metadata



def encode(uow: UnitOfWork) -> Iterator[bytes]:
    """
    Frame C{uow} as the chunks of a spool file; a large body is streamed
    from where it lies, a chunk at a time.
    """
    return framed(encodeHead(uow), uow)



def framed(head: bytes, uow: UnitOfWork) -> Iterator[bytes]:
    yield head
    checksum = zlib.crc32(head)
    for chunk in uow.bodyChunks():
        checksum = zlib.crc32(chunk, checksum)
        yield chunk
    yield _CHECKSUM.pack(checksum)



def decode(data: bytes) -> UnitOfWork:
    """
    Parse a spool file held in memory.

    @raise CorruptSpoolFile: The file is torn, corrupt or not a spool file.
    """
    return decodeFrom(io.BytesIO(data), len(data), None)



def decodeFrom(f: IO[bytes], size: int, path: Path | None) -> UnitOfWork:
    """
    Parse the spool file C{f} of C{size} bytes, checking it whole. With a
    C{path}, a body larger than L{INLINE_BODY_BYTES} is not held: the UOW
    refers to it in the file.
    """
    fixed = len(MAGIC) + _LENGTHS.size
    head = f.read(fixed)
    if size < fixed + _CHECKSUM.size or len(head) != fixed or not head.startswith(MAGIC):
        raise CorruptSpoolFile("not a spool file, or torn before its header ended")
    metadataLength, bodyLength = _LENGTHS.unpack_from(head, len(MAGIC))
    if metadataLength > _MAX_METADATA:
        raise CorruptSpoolFile(f"metadata length {metadataLength} is implausible")
    end = fixed + metadataLength + bodyLength
    if size != end + _CHECKSUM.size:
        raise CorruptSpoolFile(f"length is {size} bytes, the frame says {end + _CHECKSUM.size}")
    rawMetadata = f.read(metadataLength)
    checksum = zlib.crc32(rawMetadata, zlib.crc32(head))
    held = path is None or bodyLength <= INLINE_BODY_BYTES
    chunks = []
    left = bodyLength
    while left:
        chunk = f.read(min(left, CHUNK_BYTES))
        if not chunk:
            raise CorruptSpoolFile("the file ended inside its body")
        checksum = zlib.crc32(chunk, checksum)
        left -= len(chunk)
        if held:
            chunks.append(chunk)
    (expected,) = _CHECKSUM.unpack(f.read(_CHECKSUM.size))
    if checksum != expected:
        raise CorruptSpoolFile("checksum mismatch")
    body: bytes | SpooledBody = b"".join(chunks)
    if not held:
        assert path is not None
        body = SpooledBody(path, fixed + metadataLength, bodyLength)
    try:
        metadata = json.loads(rawMetadata)
        uowId = int(metadata["uow"])
        return UnitOfWork(
            id=uowId,
            attempt=uowId,
            method=str(metadata["method"]),
            key=str(metadata["key"]),
            route=str(metadata["route"]),
            body=body,
            contentType=metadata["content_type"],
            receivedAt=float(metadata["received_at"]),
            idempotencyKey=metadata["idempotency_key"],
        )
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptSpoolFile(f"unreadable metadata: {e}") from e
