"""How a client's adapter update travels: the wire format shared by client and server.

`float32`: the trained adapter tensors as they are.
`int8-delta`: the change from the adapter the server sent, in blocks of BLOCK values,
each block scaled by its largest magnitude and rounded to int8 (with one float32 scale
per block). The server adds the decoded change to what it sent. Each decoded value is
within scale/2 = max|change in its block| / 254 of the trained one, an error relative
to the round's change rather than to the weights, so it does not accumulate in the
global adapter. Encoding happens after DP training: it is post-processing and costs
no privacy.
"""

from __future__ import annotations

import numpy as np

ENCODINGS = ("float32", "int8-delta")
BLOCK = 128
SCALE_SUFFIX = "#scale"


class CodecError(ValueError):
    """An encoded update that does not decode against the adapter it claims to change."""


def _blocks(flat: np.ndarray) -> np.ndarray:
    pad = (-flat.size) % BLOCK
    return np.pad(flat, (0, pad)).reshape(-1, BLOCK)


def encode(arrays: dict[str, np.ndarray], reference: dict[str, np.ndarray],
           encoding: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(tensors to send, block scales to send; empty for float32)."""
    if encoding == "float32" or not reference:
        return arrays, {}
    if encoding != "int8-delta":
        raise CodecError(f"unknown update-encoding {encoding!r} (known: {', '.join(ENCODINGS)})")
    values, scales = {}, {}
    for name, new in arrays.items():
        delta = _blocks((new.astype(np.float32) - reference[name]).ravel())
        scale = np.abs(delta).max(axis=1) / 127.0
        q = np.rint(delta / np.where(scale > 0, scale, 1.0)[:, None])
        values[name] = q.astype(np.int8).ravel()[:new.size].reshape(new.shape)
        scales[name] = scale.astype(np.float32)
    return values, scales


def decode(values: dict[str, np.ndarray], scales: dict[str, np.ndarray],
           reference: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The trained adapter: `reference` plus the decoded change (no scales: float32 as sent).
    Non-finite scales decode to non-finite values, which the server's validation rejects."""
    if not scales:
        return values
    if set(values) != set(scales) or set(values) != set(reference):
        raise CodecError("encoded update does not name the tensors that were sent")
    out = {}
    for name, q in values.items():
        ref, scale = reference[name], scales[name]
        if q.dtype != np.int8 or q.shape != ref.shape or scale.dtype != np.float32 \
                or scale.shape != (-(-q.size // BLOCK),):
            raise CodecError(f"encoded tensor {name} does not match the adapter sent "
                             f"(shape {q.shape}, dtype {q.dtype}; scales {scale.shape}, "
                             f"{scale.dtype})")
        delta = _blocks(q.astype(np.float32).ravel()) * scale[:, None]
        out[name] = ref + delta.ravel()[:q.size].reshape(q.shape)
    return out


def error_bound(arrays: dict[str, np.ndarray],
                reference: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per value, the most that int8-delta may change it (max |change| in its block / 254)."""
    out = {}
    for name, new in arrays.items():
        delta = _blocks((new.astype(np.float32) - reference[name]).ravel())
        bound = np.repeat(np.abs(delta).max(axis=1) / 254.0, BLOCK)
        out[name] = bound[:new.size].reshape(new.shape)
    return out


def pack(values: dict[str, np.ndarray], scales: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One flat record: the tensors, and each tensor's scales under `<name>#scale`."""
    return {**values, **{name + SCALE_SUFFIX: s for name, s in scales.items()}}


def unpack(record: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    values = {k: v for k, v in record.items() if not k.endswith(SCALE_SUFFIX)}
    scales = {k.removesuffix(SCALE_SUFFIX): v for k, v in record.items()
              if k.endswith(SCALE_SUFFIX)}
    return values, scales
