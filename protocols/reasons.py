"""Why a contribution was rejected. Recorded in metrics, summaries and (later) the ledger."""

from __future__ import annotations

import enum


class RejectReason(enum.StrEnum):
    """Every reason a coordinator may give for rejecting a contribution, checked in this order."""

    NODE_ERROR = "node_error"
    """The node answered with an error instead of an update."""
    UNSIGNED = "unsigned"
    """No signed update envelope in the reply."""
    MALFORMED = "malformed"
    """The envelope, arrays or metrics could not be decoded, or disagree with each other."""
    UNKNOWN_MEMBER = "unknown_member"
    """The sender's key is not in the federation manifest."""
    BAD_SIGNATURE = "bad_signature"
    """The signature does not verify under the sender's registered key."""
    INACTIVE_MEMBER = "inactive_member"
    """A validly signed update from a member the manifest in force lists as suspended or revoked."""
    WRONG_FEDERATION = "wrong_federation"
    """Signed for another federation."""
    WRONG_RUN = "wrong_run"
    """Signed for another run of this federation."""
    REPLAY = "replay"
    """Signed for an earlier round, or a second update from the same member in one round."""
    WRONG_ROUND = "wrong_round"
    """Signed for a round that has not started."""
    STALE_BASE = "stale_base"
    """Trained from a global model other than the one this round sent out."""
    SHAPE_MISMATCH = "shape_mismatch"
    """Array names, dtypes or shapes differ from the global model's."""
    DIGEST_MISMATCH = "digest_mismatch"
    """The arrays received are not the arrays that were signed (tampered in transit or after signing)."""
    NON_FINITE = "non_finite"
    """NaN or infinite values."""
    EXAMPLE_COUNT = "example_count"
    """The example count is zero, negative or above the member's declared maximum."""
    BELOW_QUALITY_FLOOR = "below_quality_floor"
    """A valid update whose quality, measured on the coordinator's held-out data, is worse than the policy's floor."""
