"""A model a user gives that cannot be used is refused with one line naming it, before
a simulation starts: a bad .gguf file, a folder without weights or with corrupt ones."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from client.base_model import ModelError, check_model, prepare_base
from contracts.config import validate
from contracts.errors import FedslmError


def _small_gguf(path: Path) -> Path:
    import gguf

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tensor("t", np.arange(4096, dtype=np.float32).reshape(64, 64))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _one_line_error(call, match: str) -> ModelError:
    with pytest.raises(ModelError, match=match) as caught:
        call()
    assert "\n" not in str(caught.value)
    assert isinstance(caught.value, FedslmError) and caught.value.exit_code == 2
    return caught.value


@pytest.mark.parametrize("kind", ["random", "empty", "truncated"])
def test_an_unreadable_gguf_is_refused_by_name(kind, tmp_path):
    path = tmp_path / f"{kind}.gguf"
    if kind == "random":
        path.write_bytes(os.urandom(5000))
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        whole = _small_gguf(tmp_path / "whole.gguf").read_bytes()
        path.write_bytes(whole[:-1000])
    _one_line_error(lambda: prepare_base(str(path), tmp_path / "cache"),
                    f"^{path} is not a readable GGUF file \\(")
    assert not list((tmp_path / "cache").glob("models/*"))  # nothing half-cached


def _copy(tiny_model: Path, target: Path) -> Path:
    shutil.copytree(tiny_model, target)
    return target


def test_a_readable_folder_passes(tiny_model):
    check_model(str(tiny_model))
    check_model("HuggingFaceTB/SmolLM2-135M")  # a hub id: resolved by the clients


def test_a_folder_without_weights_is_refused(tiny_model, tmp_path):
    folder = _copy(tiny_model, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    _one_line_error(lambda: check_model(str(folder)), "has no weights")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_safetensors_are_refused_by_name(damage, tiny_model, tmp_path):
    folder = _copy(tiny_model, tmp_path / "m")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"garbage": os.urandom(2000), "truncated": data[: len(data) // 2],
                         "empty": b""}[damage])
    _one_line_error(lambda: check_model(str(folder)),
                    f"^{weights} is not a readable safetensors file \\(")


def test_a_sharded_folder_missing_a_shard_is_refused(tiny_model, tmp_path):
    folder = _copy(tiny_model, tmp_path / "m")
    (folder / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "model.safetensors", "b": "model-2.safetensors"}}')
    _one_line_error(lambda: check_model(str(folder)), "lacks model-2.safetensors")


def test_the_simulation_preflight_checks_the_weights(tiny_model, text_clients, tmp_path):
    from simulations.engine import preflight

    folder = _copy(tiny_model, tmp_path / "m")
    (folder / "model.safetensors").write_bytes(b"not safetensors")
    config = validate({"model": str(folder), "data": str(text_clients), "num-clients": 2})
    _one_line_error(lambda: preflight(config), "is not a readable safetensors file")
