"""How a generate request finds the replica that holds its subject's cache: the two ways the app can route
(``ServeSettings.routing``), and the request router of the second.

* ``multiplexed``: the ingress calls the generator with ``multiplexed_model_id=subject_id`` and the replicas hold
  caches with ``@serve.multiplexed``; Serve's default router sends a request to a replica that reports the id
  (reports travel replica -> controller -> routers every 0.1 s), else to one holding the fewest. Serve splits
  ``@serve.batch`` batches by that id, so the generator enqueues outside the request context
  (``batching.outside_request``) for batches to mix subjects.
* ``subject_affinity``: the subject id is plain request data (the first argument: a subject id, or a job with a
  ``subject_id``); :class:`SubjectAffinityRouter` picks the replica from it, and each replica holds caches in its
  own LRU (``generator.SubjectLRU``). No multiplexed id anywhere, so batches mix subjects with no detour.

The affinity router needs no reports from the replicas: every subject has a home replica by rendezvous hashing
of (subject id, replica id), the same in every ingress replica, and when replicas come or go only the subjects of
those replicas move. Load bounds the affinity: a home whose queue is longer than the shortest by more than
``imbalance_slack`` requests (one batch by default: a wait of one more device call, against one cache load) goes
to the back, and a full one is passed over by Serve (it refuses the request); the next choice is the subject's
second-ranked replica, so a subject that spills lands on the same second replica each time and stays cached in
at most two LRUs.

This module imports no torch: it runs in the ingress (the router lives in the process that holds the handle).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from ray.serve.request_router import LocalityMixin, PendingRequest, RequestRouter, RunningReplica

def routing_key(args: Sequence[Any]) -> str | None:
    """The subject a generator call is about: its first argument (a subject id, or an object with ``subject_id``,
    e.g. a GenerateJob); None for calls about no subject (describe, stats)."""
    if not args:
        return None
    first = args[0]
    if isinstance(first, str):
        return first
    subject = getattr(first, "subject_id", None)
    return subject if isinstance(subject, str) else None


def rendezvous_order(subject_id: str, replica_ids: Sequence[str]) -> list[str]:
    """``replica_ids`` from the subject's home to its last choice (highest random weight first): stable for a
    subject, spread evenly over subjects, and a replica leaving moves only the subjects it was home to."""
    def weight(replica_id: str) -> bytes:
        return hashlib.blake2b(f"{subject_id}\0{replica_id}".encode(), digest_size=8).digest()

    return sorted(replica_ids, key=weight, reverse=True)


def preference(subject_id: str, queue_lengths: dict[str, int | None], slack: int) -> list[str]:
    """Replica ids in the order to try for a subject: rendezvous order, except that a replica whose known queue
    exceeds the shortest known one by more than ``slack`` moves behind the others (in rendezvous order too).
    ``queue_lengths`` maps every candidate to its cached queue length, None where unknown (not penalised)."""
    order = rendezvous_order(subject_id, list(queue_lengths))
    known = [q for q in queue_lengths.values() if q is not None]
    if not known:
        return order
    shortest = min(known)
    overloaded = {r for r, q in queue_lengths.items() if q is not None and q > shortest + slack}
    return [r for r in order if r not in overloaded] + [r for r in order if r in overloaded]


class SubjectAffinityRouter(LocalityMixin, RequestRouter):
    """Serve request router (alpha API, ``ray.serve.request_router``) for ``routing: subject_affinity``.

    Not with ``FIFOMixin``: FIFO hands a chosen replica to the oldest waiting request, whatever its subject,
    which would undo the choice; without it the replica chosen for a request serves that request. Not with
    ``MultiplexMixin``: there is no multiplexed id. ``LocalityMixin`` orders calls about no subject (same node
    first, when Serve is asked to prefer it)."""

    def initialize_state(self, imbalance_slack: int = 8, **kwargs: Any) -> None:
        """Called by Serve with ``RequestRouterConfig.request_router_kwargs``."""
        self.imbalance_slack = imbalance_slack

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is not None:
            # Once every rank refused (all full), Serve backs off before asking again, instead of spinning.
            pending_request.routing_context.should_backoff = True
        subject = routing_key(pending_request.args) if pending_request is not None else None
        if subject is None or not candidate_replicas:
            return self.rank_replicas_via_locality(candidate_replicas)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        # Queue lengths as the router last saw them (probes and its own sends); Serve probes the ones it lacks.
        lengths = {rid: self.replica_queue_len_cache.get(r.replica_id) for rid, r in by_id.items()}
        # One replica per rank: Serve tries them in this order and takes the first that accepts.
        return [[by_id[rid]] for rid in preference(subject, lengths, self.imbalance_slack)]
