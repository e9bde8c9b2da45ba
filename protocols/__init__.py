"""What crosses a border: identities, digests, signed envelopes, the manifest, model files.

Pure Python + numpy + cryptography; never imports torch or flwr. Specified in docs/PROTOCOL.md.
"""

from protocols.digest import ArraySpec, params_digest, structure
from protocols.encoding import ConfigValue
from protocols.envelope import (
    ID_PATTERN,
    VERSION,
    EvaluationEnvelope,
    GlobalModelEnvelope,
    SignedBlob,
    UpdateEnvelope,
    open_global_model,
    sign_evaluation,
    sign_global_model,
    sign_update,
)
from protocols.errors import (
    DecodeError,
    KeyFileError,
    ManifestDecodeError,
    ManifestError,
    ProtocolError,
    SignatureError,
    WeakKeyError,
)
from protocols.identity import (
    Domain,
    PublicKey,
    SigningKey,
    create_flower_auth_key,
    flower_auth_public_key,
    load_flower_auth_public_key,
    load_public_key,
    load_signing_key,
    save_public_key,
    save_signing_key,
)
from protocols.manifest import Manifest, Member, Status, check_successor
from protocols.modelfile import SignedModel, read_signed_model, write_signed_model
from protocols.payload import PAYLOADS, Decoded, wire_structure
from protocols.reasons import RejectReason

__all__ = [
    "ID_PATTERN",
    "PAYLOADS",
    "VERSION",
    "ArraySpec",
    "ConfigValue",
    "DecodeError",
    "Decoded",
    "Domain",
    "EvaluationEnvelope",
    "GlobalModelEnvelope",
    "KeyFileError",
    "Manifest",
    "ManifestDecodeError",
    "ManifestError",
    "Member",
    "ProtocolError",
    "PublicKey",
    "RejectReason",
    "SignatureError",
    "SignedBlob",
    "SignedModel",
    "SigningKey",
    "Status",
    "UpdateEnvelope",
    "WeakKeyError",
    "check_successor",
    "create_flower_auth_key",
    "flower_auth_public_key",
    "load_flower_auth_public_key",
    "load_public_key",
    "load_signing_key",
    "open_global_model",
    "params_digest",
    "read_signed_model",
    "save_public_key",
    "save_signing_key",
    "sign_evaluation",
    "sign_global_model",
    "sign_update",
    "structure",
    "wire_structure",
    "write_signed_model",
]
