"""
The interfaces that the pipeline's parts implement.
"""

from zope.interface import Attribute, Interface


class IStash(Interface):
    """
    A destination that holds a copy of each mutation.

    Rules every implementation keeps (the stash contract):

      - C{stash} is idempotent per UOW id: a replay after a crash stores once.
      - C{rollback} is idempotent, safe when C{stash} never ran, and commutes
        with a late C{stash} of the same UOW and attempt: rollback first, then
        the late stash, leaves nothing behind.
      - C{rollback} restores the before-image only while the UOW's own write is
        still the current one; it never clobbers a later UOW's write.
      - A UOW never overwrites a newer UOW's write on the same key.
      - After C{commit} the mutation is permanent.
      - A failed verdict with a 4xx status means nothing was stored by this
        attempt: on a UOW's first attempt the pipeline does not call
        C{rollback} after it; a later attempt (a retry, a re-drive after a
        crash) calls it, since an earlier attempt may have stored. An
        unknown outcome is a 5xx.
    """

    name = Attribute("The stash's name from the configuration (C{str}).")

    def stash(uow):
        """
        Apply the mutation of C{uow} and prepare its rollback.

        @param uow: The unit of work.
        @type uow: L{apicontainer.uow.UnitOfWork}
        @return: A Deferred that fires with a L{apicontainer.uow.Verdict}:
            declined (nothing to do here), stored (rollback prepared) or
            failed (with the 4xx or 5xx status that says why).
        """

    def rollback(uow):
        """
        Undo whatever C{stash} did, or will do, for C{uow}.

        @return: A Deferred that fires with L{None} once the undo is durable.
        """

    def commit(uow):
        """
        Make the mutation of C{uow} permanent and forget its rollback data.

        @return: A Deferred that fires with L{None}.
        """


class IBatchStash(IStash):
    """
    A stash that takes many UOWs in one call: one transaction, one sync and
    one Deferred for them all, where L{IStash} takes one call each. The
    pipeline uses it when a stash provides it, and calls L{IStash}'s methods
    one UOW at a time otherwise (L{apicontainer.pipeline.batchOf}).

    A batch never holds two UOWs on the same key, and holds them in UOW id
    order. Each UOW of a batch keeps the rules of L{IStash}, as if it came
    alone: one UOW's failure leaves the others' writes whole.
    """

    def stashBatch(uows):
        """
        Apply the mutation of each of C{uows} and prepare its rollback.

        @param uows: A sequence of L{apicontainer.uow.UnitOfWork}.
        @return: A Deferred that fires with a list of
            L{apicontainer.uow.Verdict}, one per UOW, in the order given. If
            it fails, every UOW of the batch has an unknown outcome.
        """

    def commitBatch(uows):
        """
        Make the mutation of each of C{uows} permanent and forget its
        rollback data.

        @return: A Deferred that fires with a list, one per UOW in the order
            given: L{None} where it committed, the
            L{twisted.python.failure.Failure} where it did not. If it
            fails, none is known to have committed (a commit is idempotent:
            the pipeline asks again, one UOW at a time).
        """


class IReader(Interface):
    """
    A stash that can answer reads.
    """

    name = Attribute("The stash's name from the configuration (C{str}).")

    def read(key):
        """
        Look up the current document stored under C{key}.

        @param key: The resource key (the request path), a C{str}.
        @return: A Deferred that fires with a L{apicontainer.uow.Document}, or
            with L{None} when the key is absent or deleted.
        """


class IStartable(Interface):
    """
    A stash that must open connections or files before its first UOW.
    """

    def start():
        """
        Prepare for work (open files, create tables).

        @return: A Deferred that fires with L{None} when ready.
        """

    def stop():
        """
        Release what C{start} acquired.

        @return: A Deferred that fires with L{None} when done.
        """


class IProbe(Interface):
    """
    A stash that can tell whether its destination is reachable, for
    C{GET /_ready}.
    """

    def probe():
        """
        Check the destination with the cheapest real round trip.

        @return: A Deferred that fires with L{None} when it answered, or fails
            with the reason it did not.
        """


class ILocalStorage(Interface):
    """
    A stash that keeps its data on this machine's disks. Before a write is
    spooled, ingress checks that every disk it lands on has room for it
    beyond C{limits.min_free_bytes}, and answers 503 C{disk_full} if not.
    """

    location = Attribute("The directory it writes in (a L{pathlib.Path}).")
    files = Attribute(
        "The files it opens by name (a sequence of L{pathlib.Path}), each of"
        " which must be a regular file where it exists."
    )

    def bytesFor(size):
        """
        An upper estimate of the disk space that one write of a body of
        C{size} bytes takes there until it is committed (the data, its
        before-image, and what the storage engine writes beside them).

        @return: A number of bytes (C{int}).
        """


class IPrunable(Interface):
    """
    A stash that keeps a marker for each rolled-back UOW (which blocks a
    late C{stash} of it) and can forget the old ones. Attempt ids come from
    the UOW id sequence; the server calls C{prune} now and then with a
    horizon below which no attempt can still see a stash call: it started
    more than C{idempotency.retention_s} ago, and below every UOW under way,
    failed or unsettled.
    """

    def prune(horizon):
        """
        Forget the rollback markers whose attempt id (the latest attempt
        they block) is below C{horizon}; rollback data of stored UOWs (not
        yet committed) stays.

        @return: A Deferred that fires with how many were forgotten (an
            C{int}), or L{None} where that is not known.
        """


class ISpool(Interface):
    """
    Where each request is kept, durably, from admission until its UOW is
    final: the calls the pipeline makes on a spool besides the writes and
    removals that go through the L{IJournal}. The C{file} backend is
    L{apicontainer.storage.Spool}.
    """

    directory = Attribute(
        "The directory of the spool files (a L{pathlib.Path}), for the disk"
        " space check and the metrics."
    )

    def open():
        """
        Create or check the spool (blocking; at start-up).
        """

    def scan():
        """
        @return: A Deferred that fires with the ids of every UOW spooled, in
            UOW order.
        """

    def load(uowId):
        """
        @return: A Deferred that fires with the L{apicontainer.uow.UnitOfWork}
            of C{uowId}; it fails with L{apicontainer.storage.CorruptSpoolFile},
            or with L{FileNotFoundError} when there is none.
        """

    def delete(uowId):
        """
        Remove the UOW's spool file, durably; one already gone is fine.

        @return: A Deferred that fires with L{None}.
        """

    def quarantine(uowId):
        """
        Move a corrupt spool file aside, never to be replayed.

        @return: A Deferred that fires with L{None}.
        """


class IJournal(Interface):
    """
    Makes spool writes and final states durable, in the server or in a
    child process of its own.
    """

    def start():
        """
        Get ready.

        @return: A Deferred that fires with L{None}; it fails if the journal
            cannot start.
        """

    def stop():
        """
        Finish what is under way, and stop.

        @return: A Deferred that fires with L{None}.
        """

    def write(uow):
        """
        Spool C{uow} durably.

        @return: A Deferred that fires with the UOW once its spool file is
            durable; it fails with L{apicontainer.storage.SpoolError}.
        """

    def settle(record, removeSpool):
        """
        Record a final state (an L{apicontainer.storage.StateRecord})
        durably, then, with C{removeSpool}, remove the UOW's spool file.

        @return: A Deferred that fires once the record is durable, with the
            removal's error, if it failed (the record is durable all the
            same); it fails with the record's error.
        """

    def settleBatch(records):
        """
        Record each of C{records}' final states durably, then remove each
        UOW's spool file: L{settle} with C{removeSpool} for each, as one
        batch.

        @return: A Deferred that fires with one outcome per record, in the
            order given: what L{settle} would have given (L{None}, or the
            removal's error), or the L{twisted.python.failure.Failure} of a
            record that is not durable.
        """


class IFailQueue(Interface):
    """
    A durable record of UOWs that failed with a 5xx and wait for a retry,
    with their retry schedule: every call the pipeline makes on it. The
    C{file} backend is L{apicontainer.storage.FileFailQueue}.
    """

    retry = Attribute(
        "The retry policy (L{apicontainer.storage.RetryPolicy}); a reload replaces it."
    )

    def open():
        """
        Load the queue (blocking; at start-up, before the reactor runs).

        @return: The records that could not be read (a list of paths or
            names), left in place for an operator.
        """

    def failed(report, route, rollbackFailed=(), compensate=False):
        """
        Build, without recording it, the entry of a UOW whose latest attempt
        failed: its attempts counted on from its previous entry, its next
        attempt scheduled by the retry policy, or parked (stuck when
        C{compensate}) after C{max_attempts}.

        @param report: The attempt's L{apicontainer.uow.Report}.
        @param route: The UOW's route pattern.
        @param rollbackFailed: The stashes whose rollback failed.
        @param compensate: Whether only the rollback is to be retried.
        @return: A L{apicontainer.storage.FailedUOW}.
        """

    def markRetrying(uowId):
        """
        Take the entry of C{uowId} for an attempt now, whatever its schedule
        or state, unless an attempt is already under way. A backend shared
        by several servers takes it for one of them only.

        @return: A Deferred that fires with the entry, marked as retrying, or
            with L{None}.
        """

    def put(entry):
        """
        Record C{entry} durably, replacing an earlier record of the same UOW.

        @param entry: A L{apicontainer.storage.FailedUOW}.
        @return: A Deferred that fires with L{None} once the record is durable.
        """

    def get(uowId):
        """
        @return: The L{apicontainer.storage.FailedUOW} for C{uowId}, or
            L{None}.
        """

    def fresh(uowId):
        """
        The entry for C{uowId} as the queue's durable store has it now: on a
        queue other servers share, L{get} may not have heard their latest
        write yet.

        @return: A Deferred that fires with the entry, or L{None}.
        """

    def list(state=None):
        """
        @param state: Only entries in this state, or all when L{None}.
        @return: The entries, oldest UOW first.
        """

    def takeDue():
        """
        Take the entries whose next attempt is due on the queue's clock. A
        backend shared by several servers gives each entry to one of them
        only.

        @return: A Deferred that fires with the entries, oldest UOW first,
            each marked as retrying.
        """

    def drop(uowId):
        """
        Forget the entry for C{uowId}, durably. On a shared queue, an entry
        that another server took for an attempt meanwhile is not dropped
        (L{apicontainer.storage.Taken}).

        @return: A Deferred that fires with the dropped entry, or L{None} when
            there was none.
        """
