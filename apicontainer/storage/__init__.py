"""
What the pipeline keeps on this machine's disk: the spool, the journal
that writes it (and the state store) from a child process, the fail queue,
the UOW ids, and the helpers they share (durable files, group commit, SQLite
transactions, the child-process protocol).

The spool and the fail queue are backends behind
L{apicontainer.interfaces.ISpool} and L{apicontainer.interfaces.IFailQueue};
the C{file} backends here are the default ones.
"""

from ._backends import (
    FAILQUEUE_BACKENDS,
    SPOOL_BACKENDS,
    SpoolBackend,
    fileFailQueue,
    fileSpool,
    jetstreamFailQueue,
    jetstreamSpool,
)
from ._childprocess import CallBatch, ChildRunner, becomeChild, readIn, serve
from ._childprotocol import Answer, Command, decodeUOW, encodeUOW, frame, manyResults, refusal, refused
from ._durable import (
    fsyncDirectory,
    makeDirectories,
    removeDurably,
    removeFile,
    removeTemporaries,
    syncFilesystem,
    writeAtomically,
    writeFile,
)
from ._failqueue import FailedUOW, FileFailQueue, RetryPolicy, Taken
from ._groupcommit import GroupCommit, Operation, Result, each
from ._jetstream import (
    JetStreamLink,
    JetStreamSettings,
    SpoolTooLarge,
    SpoolUnavailable,
    StreamMismatch,
    aio,
)
from ._journal import InlineJournal, ProcessJournal
from ._jsconsume import PartitionConsumers, Verdicts
from ._jsspool import Duplicate
from ._jsstate import SharedFailQueue, SharedStates
from ._spool import Spool, SpoolError, SpoolFull
from ._spoolfile import CorruptSpoolFile
from ._states import StateRecord, StateStore
from ._transactions import immediate
from ._uowids import UOWIds, nameNumbering, numberingOf

__all__ = [
    "FAILQUEUE_BACKENDS",
    "SPOOL_BACKENDS",
    "SpoolBackend",
    "fileFailQueue",
    "fileSpool",
    "jetstreamFailQueue",
    "jetstreamSpool",
    "Duplicate",
    "JetStreamLink",
    "JetStreamSettings",
    "PartitionConsumers",
    "SharedFailQueue",
    "SharedStates",
    "SpoolTooLarge",
    "SpoolUnavailable",
    "StreamMismatch",
    "Verdicts",
    "aio",
    "Answer",
    "CallBatch",
    "ChildRunner",
    "Command",
    "CorruptSpoolFile",
    "FailedUOW",
    "FileFailQueue",
    "GroupCommit",
    "InlineJournal",
    "Operation",
    "ProcessJournal",
    "Result",
    "RetryPolicy",
    "Spool",
    "SpoolError",
    "SpoolFull",
    "StateRecord",
    "StateStore",
    "Taken",
    "UOWIds",
    "becomeChild",
    "decodeUOW",
    "each",
    "encodeUOW",
    "frame",
    "fsyncDirectory",
    "immediate",
    "makeDirectories",
    "nameNumbering",
    "numberingOf",
    "readIn",
    "manyResults",
    "refusal",
    "refused",
    "removeDurably",
    "removeFile",
    "removeTemporaries",
    "serve",
    "syncFilesystem",
    "writeAtomically",
    "writeFile",
]
