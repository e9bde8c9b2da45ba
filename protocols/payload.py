"""Compressed updates: what the arrays of an update mean, and how anyone turns them back into weights.

A node sends its update as one of four payload kinds, named in its signed `UpdateEnvelope.payload`
(docs/PROTOCOL.md, "Payloads"). The signed `update_digest` covers the arrays as sent, so a
compressed update is signed over its compressed bytes.

- `weights`: the trained parameter vector itself (the template's names, dtypes and shapes).
- `delta-fp16`: for each floating array, its change from the global model it was trained on
  (the *base*) in float16, same shape.
- `delta-int8`: for each floating array, one `uint8` vector: the float32 scales of its blocks of
  `BLOCK["delta-int8"]` = 256 values, little-endian, then one int8 code per value (two's
  complement, in -127..127). Value `i` (C order) is `code[i] * scale[i // 256]`.
- `delta-int4`: the same with blocks of `BLOCK["delta-int4"]` = 128 values and 4-bit codes in -7..7,
  two per byte: value `2k` in the low nibble of byte `k`, value `2k + 1` in the high nibble (a
  last unpaired nibble is 0).

Non-floating arrays (integer counters, flags) travel as they are in every payload. Array names
never change, so no derived name can collide with a parameter name.

Bytes per floating value (float32 model): 4 (weights), 2 (fp16), 1 + 4/256 = 1.016 (int8: 0.254x),
0.5 + 4/128 = 0.531 (int4: 0.133x). Scales are float32 so that deltas of any size keep their
relative precision (float16 scales would underflow for the 1e-6-sized deltas of a fine-tuning run).

Decoding (`decode`, `Decoded`) is exact arithmetic, identical on every IEEE-754 machine: per value,
`d = float64(code) * float64(scale)` (exact: at most 8 x 24 significant bits), or `d = float64(h)`
for a float16 delta `h`; then `w = dtype(float64(base) + d)`: one rounding to float64 and one
round-to-nearest-even cast to the template's dtype. Untrusted input (a wrong length or dtype, a
scale that is negative or not finite, a code out of range, a result that overflows the dtype)
raises ValueError and nothing else.

Encoding (`encode`, at the node) adds the residual of its previous round (error feedback, Seide et
al. 2014; Karimireddy et al., arXiv:1901.09847) to the delta, quantizes, decodes exactly as above,
and keeps what was lost as the next residual.

Pure numpy: no torch, no flwr.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from protocols.aggregation import UpdateSource, all_finite
from protocols.digest import ArraySpec

WEIGHTS = "weights"
DELTA_FP16 = "delta-fp16"
DELTA_INT8 = "delta-int8"
DELTA_INT4 = "delta-int4"
PAYLOADS = (WEIGHTS, DELTA_FP16, DELTA_INT8, DELTA_INT4)
"""Every payload kind, in order of size."""

BLOCK = {DELTA_INT8: 256, DELTA_INT4: 128}
"""Values per block (one float32 scale each) of the block-quantized kinds."""
QMAX = {DELTA_INT8: 127, DELTA_INT4: 7}
"""Largest code magnitude (symmetric: -128 and -8 are never valid codes)."""

_SCALE = np.dtype("<f4")
_F32_MAX = float(np.finfo(np.float32).max)
_F16_MAX = float(np.finfo(np.float16).max)


def _check_payload(payload: str) -> None:
    if payload not in PAYLOADS:
        raise ValueError(f"unknown payload kind {payload!r} (known: {', '.join(PAYLOADS)})")


def _is_float(spec: ArraySpec) -> bool:
    return np.dtype(spec.dtype).kind == "f"


def _size(spec: ArraySpec) -> int:
    return int(np.prod(spec.shape, dtype=np.int64)) if spec.shape else 1


def _blocks(n: int, payload: str) -> int:
    return -(-n // BLOCK[payload])


def wire_spec(spec: ArraySpec, payload: str) -> ArraySpec:
    """The dtype and shape one template array travels as under `payload`."""
    _check_payload(payload)
    if payload == WEIGHTS or not _is_float(spec):
        return spec
    if payload == DELTA_FP16:
        return ArraySpec("float16", tuple(spec.shape))
    n = _size(spec)
    codes = n if payload == DELTA_INT8 else -(-n // 2)
    return ArraySpec("uint8", (_SCALE.itemsize * _blocks(n, payload) + codes,))


def wire_structure(template: Mapping[str, ArraySpec], payload: str) -> dict[str, ArraySpec]:
    """The exact names, dtypes and shapes an update of `payload` carries: the template's names, each
    array as `wire_spec` says. Raises ValueError for an unknown payload kind."""
    _check_payload(payload)
    return {name: wire_spec(spec, payload) for name, spec in template.items()}


# ---- decoding (coordinator, audit): untrusted input -----------------------------------------------------


def decode_array(wire: np.ndarray, base: np.ndarray, spec: ArraySpec, payload: str) -> np.ndarray:
    """The weights one wire array stands for (dtype and shape of `spec`); ValueError if it is malformed."""
    _check_payload(payload)
    try:
        wire = np.asarray(wire)
    except Exception as exc:  # an object that is not an array at all
        raise ValueError(f"not an array ({type(exc).__name__})") from exc
    expected = wire_spec(spec, payload)
    if wire.dtype.name != expected.dtype or tuple(wire.shape) != tuple(expected.shape):
        raise ValueError(f"is {wire.dtype.name}{list(wire.shape)}, {payload} needs {expected}")
    if payload == WEIGHTS or not _is_float(spec):  # sent as they are
        return wire
    base = np.asarray(base)
    if base.dtype.name != spec.dtype or tuple(base.shape) != tuple(spec.shape):
        raise ValueError(f"the base array is {base.dtype.name}{list(base.shape)}, the template says {spec}")
    n = _size(spec)
    flat_base = base.reshape(-1)
    out = np.empty(n, dtype=spec.dtype)
    if payload == DELTA_FP16:
        if not all_finite(wire):
            raise ValueError("holds a float16 delta that is not finite")
        flat = wire.reshape(-1)
        for lo in range(0, n, CHUNK):
            hi = min(lo + CHUNK, n)
            out[lo:hi] = _add(flat_base[lo:hi], flat[lo:hi].astype(np.float64), spec)
        return out.reshape(spec.shape)
    raw = np.ascontiguousarray(wire)
    head = _SCALE.itemsize * _blocks(n, payload)
    with np.errstate(invalid="ignore"):
        scales = np.frombuffer(raw[:head].tobytes(), dtype=_SCALE).astype(np.float64)
    if not (np.isfinite(scales).all() and (scales >= 0).all()):
        raise ValueError("holds a block scale that is negative or not finite")
    body = raw[head:]
    if payload == DELTA_INT4 and n % 2 and body[-1] >> 4:
        raise ValueError("the unused last nibble is not 0")
    for lo in range(0, n, CHUNK):  # CHUNK is a multiple of every block size and even: chunks hold whole blocks
        hi = min(lo + CHUNK, n)
        codes = _codes(body, lo, hi, payload)
        block = BLOCK[payload]
        delta = codes.astype(np.float64) * np.repeat(scales[lo // block : (hi + block - 1) // block], block)[: hi - lo]
        out[lo:hi] = _add(flat_base[lo:hi], delta, spec)
    return out.reshape(spec.shape)


CHUNK = 1 << 20
"""Values decoded at a time: transient memory stays a few times 8 MiB whatever the array's size."""


def _add(base: np.ndarray, delta: np.ndarray, spec: ArraySpec) -> np.ndarray:
    """dtype(float64(base) + delta), refusing a result that is not finite in the dtype."""
    with np.errstate(over="ignore", invalid="ignore"):
        out = (base.astype(np.float64) + delta).astype(spec.dtype)
    if not np.isfinite(out).all():
        raise ValueError(f"decodes to values that are not finite in {spec.dtype}")
    return out


def _codes(body: np.ndarray, lo: int, hi: int, payload: str) -> np.ndarray:
    """The integer codes of values lo..hi from the packed code bytes; ValueError for a code out of range."""
    qmax = QMAX[payload]
    if payload == DELTA_INT8:
        codes = body[lo:hi].view(np.int8).astype(np.int16)
    else:
        packed = body[lo // 2 : (hi + 1) // 2]  # lo is even
        nibbles = np.empty(2 * packed.size, dtype=np.int16)
        nibbles[0::2] = packed & 0x0F
        nibbles[1::2] = packed >> 4
        codes = np.where(nibbles >= 8, nibbles - 16, nibbles)[: hi - lo]
    if codes.size and (codes < -qmax).any():
        raise ValueError(f"holds a code out of -{qmax}..{qmax}")
    return codes


def decode(
    arrays: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray], template: Mapping[str, ArraySpec], payload: str
) -> dict[str, np.ndarray]:
    """The weights an update stands for, one array per template name; ValueError if malformed."""
    _check_payload(payload)
    if set(arrays) != set(template):
        missing, extra = sorted(set(template) - set(arrays)), sorted(set(arrays) - set(template))
        raise ValueError(f"the update's arrays do not match the model: missing {missing[:5]}, extra {extra[:5]}")
    out: dict[str, np.ndarray] = {}
    for name in sorted(template):
        out[name] = _decode_named(name, arrays[name], base, template[name], payload)
    return out


def _decode_named(
    name: str, wire: np.ndarray, base: Mapping[str, np.ndarray], spec: ArraySpec, payload: str
) -> np.ndarray:
    try:
        return decode_array(wire, base[name], spec, payload)
    except KeyError as exc:
        raise ValueError(f"array {name!r}: no such array in the base model") from exc
    except ValueError as exc:
        raise ValueError(f"array {name!r}: {exc}") from exc


@dataclass(frozen=True)
class Decoded:
    """An `UpdateSource` (protocols.aggregation) over a compressed update: the weights it stands for,
    decoded one array at a time (memory: one array), so aggregation sees weights whatever the payload.

    `source` is any `UpdateSource` over the wire arrays (in memory, or a stored update on disk).
    `array` raises ValueError for a malformed wire array, KeyError for a name not in the template.
    """

    source: UpdateSource
    base: Mapping[str, np.ndarray]
    template: Mapping[str, ArraySpec]
    payload: str

    def array(self, name: str) -> np.ndarray:
        """The weights of array `name`, in the template's dtype and shape."""
        spec = self.template[name]
        return _decode_named(name, self.source.array(name), self.base, spec, self.payload)


def as_weights(
    source: UpdateSource, base: Mapping[str, np.ndarray], template: Mapping[str, ArraySpec], payload: str
) -> UpdateSource:
    """What aggregation reads for an update of `payload`: the source itself for `weights`, else `Decoded`."""
    return source if payload == WEIGHTS else Decoded(source, base, template, payload)


# ---- encoding (node) ------------------------------------------------------------------------------------


def encode(
    weights: Mapping[str, np.ndarray],
    base: Mapping[str, np.ndarray],
    payload: str,
    residual: Mapping[str, np.ndarray] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The wire arrays of an update of `payload`, and the new error-feedback residual.

    For each floating array, the target is `float64(weights) - float64(base) + residual` (the
    residual of the previous round, float32 per floating array; None or a missing name: zero).
    It is compressed, decoded exactly as the coordinator will (`decode_array`), and the new residual
    is `float32(target - (decoded - base))`: what the coordinator will not see this round. For
    `weights` the arrays are the weights and the residual is empty. Raises ValueError when the
    weights or the base are not finite, or do not match each other.
    """
    _check_payload(payload)
    if set(weights) != set(base):
        raise ValueError("the weights and the base model have different arrays")
    wire: dict[str, np.ndarray] = {}
    new_residual: dict[str, np.ndarray] = {}
    for name in sorted(weights):
        w, b = np.asarray(weights[name]), np.asarray(base[name])
        spec = ArraySpec(b.dtype.name, tuple(int(d) for d in b.shape))
        if w.dtype != b.dtype or w.shape != b.shape:
            raise ValueError(f"array {name!r}: the weights are {w.dtype}{list(w.shape)}, the base {spec}")
        if payload == WEIGHTS or not _is_float(spec):
            wire[name] = w
            continue
        if not (np.isfinite(w).all() and np.isfinite(b).all()):
            raise ValueError(f"array {name!r}: the weights or the base are not finite")
        target = w.astype(np.float64).reshape(-1) - b.astype(np.float64).reshape(-1)
        r = None if residual is None else residual.get(name)
        if r is not None:
            r = np.asarray(r)
            if r.size != target.size or not np.isfinite(r).all():
                raise ValueError(f"array {name!r}: the residual does not fit (size or values)")
            target += r.astype(np.float64).reshape(-1)
        wire[name] = _compress(target, spec, payload)
        decoded = decode_array(wire[name], b, spec, payload)
        sent = decoded.astype(np.float64).reshape(-1) - b.astype(np.float64).reshape(-1)
        new_residual[name] = (target - sent).astype(np.float32).reshape(spec.shape)
    return wire, new_residual


def _compress(target: np.ndarray, spec: ArraySpec, payload: str) -> np.ndarray:
    """The wire array for a float64 delta `target` (flat); values beyond the format's range saturate."""
    if payload == DELTA_FP16:
        return np.clip(target, -_F16_MAX, _F16_MAX).astype(np.float16).reshape(spec.shape)
    n, size, qmax = target.size, BLOCK[payload], QMAX[payload]
    nb = _blocks(n, payload)
    padded = np.zeros(nb * size, dtype=np.float64)
    padded[:n] = target
    blocks = padded.reshape(nb, size)
    absmax = np.abs(blocks).max(axis=1) if nb else np.zeros(0)
    scales = np.minimum(absmax / qmax, _F32_MAX).astype(_SCALE)  # rounded to float32: what decode reads
    s64 = scales.astype(np.float64)
    safe = np.where(s64 > 0, s64, 1.0)
    codes = np.where(s64[:, None] > 0, np.rint(blocks / safe[:, None]), 0.0)
    codes = np.clip(codes, -qmax, qmax).astype(np.int8).reshape(-1)[:n]
    if payload == DELTA_INT8:
        body = codes.view(np.uint8)
    else:
        nib = (codes.astype(np.int16) & 0x0F).astype(np.uint8)
        if n % 2:
            nib = np.append(nib, np.uint8(0))
        body = (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8)
    return np.concatenate([np.frombuffer(scales.tobytes(), dtype=np.uint8), body])
