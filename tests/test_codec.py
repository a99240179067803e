"""The int8-delta update encoding against the float32 update it stands for."""

from __future__ import annotations

import numpy as np
import pytest

from contracts import codec
from server.strategies import fedavg


def _adapter(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"m.lora_A.weight": (rng.standard_normal((8, 576)) * scale).astype(np.float32),
            "m.lora_B.weight": (rng.standard_normal((576, 8)) * scale * 0.01).astype(np.float32),
            "odd.lora_A.weight": (rng.standard_normal((3, 50)) * scale).astype(np.float32)}


def _update(reference: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    change = _adapter(seed, scale=1e-3)
    change["m.lora_B.weight"][:, 0] *= 100  # blocks of very different magnitudes
    return {k: v + change[k] for k, v in reference.items()}


def test_int8_delta_is_within_its_stated_bound_of_the_float_update():
    reference = _adapter(0)
    trained = _update(reference, 1)
    values, scales = codec.encode(trained, reference, "int8-delta")
    assert all(v.dtype == np.int8 and v.shape == trained[k].shape for k, v in values.items())
    decoded = codec.decode(*codec.unpack(codec.pack(values, scales)), reference)
    bound = codec.error_bound(trained, reference)
    for name in trained:
        error = np.abs(decoded[name] - trained[name])
        assert (error <= bound[name] * (1 + 1e-3) + 1e-7).all(), name
        change = np.abs(trained[name] - reference[name]).max()
        assert error.max() <= change / 254 * 1.001  # relative to the change, not the weights
    sent = sum(v.nbytes for v in values.values()) + sum(s.nbytes for s in scales.values())
    assert sent < 0.27 * sum(v.nbytes for v in trained.values())


def test_no_change_decodes_to_the_reference_exactly():
    reference = _adapter(0)
    decoded = codec.decode(*codec.encode(reference, reference, "int8-delta"), reference)
    assert all(np.array_equal(decoded[k], reference[k]) for k in reference)


def test_float32_and_first_round_updates_travel_as_they_are():
    trained = _adapter(1)
    assert codec.encode(trained, _adapter(0), "float32") == (trained, {})
    assert codec.encode(trained, {}, "int8-delta") == (trained, {})  # nothing to diff against
    assert codec.decode(trained, {}, _adapter(0)) is trained


def test_aggregate_of_decoded_updates_is_within_the_bound_of_the_float_aggregate():
    reference = _adapter(0)
    updates = [(_update(reference, seed), n) for seed, n in ((1, 10), (2, 30), (3, 20))]
    decoded = [(codec.decode(*codec.encode(u, reference, "int8-delta"), reference), n)
               for u, n in updates]
    exact, approx = fedavg(updates), fedavg(decoded)
    bounds = [codec.error_bound(u, reference) for u, _ in updates]
    for name in exact:
        worst = max(b[name].max() for b in bounds)  # a weighted mean of errors within it
        assert np.abs(exact[name] - approx[name]).max() <= worst * 1.001 + 1e-7


def test_updates_that_do_not_fit_what_was_sent_are_refused():
    reference = _adapter(0)
    values, scales = codec.encode(_update(reference, 1), reference, "int8-delta")
    with pytest.raises(codec.CodecError, match="does not name the tensors"):
        codec.decode({**values, "extra": values["m.lora_A.weight"]}, scales, reference)
    bad = {**values, "m.lora_A.weight": values["m.lora_A.weight"][:4]}
    with pytest.raises(codec.CodecError, match="m.lora_A.weight does not match"):
        codec.decode(bad, scales, reference)
    short = {**scales, "m.lora_B.weight": scales["m.lora_B.weight"][:-1]}
    with pytest.raises(codec.CodecError, match="m.lora_B.weight does not match"):
        codec.decode(values, short, reference)
    with pytest.raises(codec.CodecError, match="unknown update-encoding"):
        codec.encode(reference, reference, "int4")


@pytest.mark.parametrize("dtype", [np.float64, np.dtype("<U4"), np.int8])
def test_scales_of_another_dtype_are_refused(dtype):
    reference = _adapter(0)
    values, scales = codec.encode(_update(reference, 1), reference, "int8-delta")
    scales["m.lora_A.weight"] = np.zeros(scales["m.lora_A.weight"].shape, dtype=dtype)
    with pytest.raises(codec.CodecError, match="m.lora_A.weight does not match"):
        codec.decode(values, scales, reference)
