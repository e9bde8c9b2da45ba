"""Names of the records that carry weft structures inside Flower messages.

node/ and coordinator/ both import these, so a key is spelled in exactly one place.
"""

ARRAYS = "arrays"
"""ArrayRecord holding the parameter vector (global model out, update back)."""
METRICS = "metrics"
"""MetricRecord with the example count and the declared metrics."""
NUM_EXAMPLES = "num-examples"
"""Key of the example count inside METRICS (Flower's convention)."""

GLOBAL_RECORD = "weft.global"
"""ConfigRecord of a train/evaluate instruction: the coordinator's signed GlobalModelEnvelope."""
UPDATE_RECORD = "weft.update"
"""ConfigRecord of a train reply: the node's signed UpdateEnvelope."""
EVALUATION_RECORD = "weft.evaluation"
"""ConfigRecord of an evaluate reply: the node's signed EvaluationEnvelope."""
ENVELOPE = "envelope"
"""Key of the envelope bytes inside GLOBAL_RECORD / UPDATE_RECORD."""
SIGNATURE = "signature"
"""Key of the Ed25519 signature bytes inside GLOBAL_RECORD / UPDATE_RECORD."""

# ---- keys of the signed training instructions (GlobalModelEnvelope.config) -------------------------
FROZEN_DIGEST = "frozen-digest"
"""Hex digest of the model state that never travels (a LoRA run's frozen base); nodes refuse a mismatch."""
PHASE = "phase"
"""`train` for every round; `personalize` for the evaluate call after the last round."""
PHASE_TRAIN = "train"
PHASE_PERSONALIZE = "personalize"
