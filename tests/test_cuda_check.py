"""simulations/cuda_check.py, the device check, run here on CPU with the tiny model."""

from __future__ import annotations

import json
import math
import shutil

from simulations import cuda_check

SMALL = ["--device", "cpu", "--steps", "2", "--warmup", "1", "--batch", "4", "--seq", "32",
         "--examples", "64"]


def test_nf4_and_float_bases_train_with_and_without_dp(tiny_model, tmp_path):
    out = tmp_path / "check.json"
    report = cuda_check.main([*SMALL, "--model", str(tiny_model), "--out", str(out),
                              "--variants", "nf4:float32,none:float32"])
    assert json.loads(out.read_text())["checks"] == report["checks"]
    runs = report["runs"]
    assert [(r["variant"], r["dp"]) for r in runs] == [
        ("nf4:float32", False), ("nf4:float32", True), ("none:float32", False),
        ("none:float32", True)]
    for r in runs:
        assert r["loss_finite"] and math.isfinite(r["mean_loss"])
        assert r["adapter_change_norm"] > 0 and r["adapter_finite"]
        assert r["timed_steps"] == 2 and r["s_per_step"] > 0
    assert runs[0]["linear4bit_modules"] > 0 and runs[2]["linear4bit_modules"] == 0
    assert report["cpu_noise_generator"] == {"ok": True, "error": None}
    assert set(report["dp_overhead"]) == {"nf4:float32", "none:float32"}
    assert report["checks"] == {"loss_finite": True, "adapter_changed": True,
                                "adapter_finite": True}


def test_random_weights_from_a_config_folder(tiny_model, tmp_path):
    """The path the device run takes: architecture and tokenizer from a folder, no weights."""
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    for f in tiny_model.iterdir():
        if f.suffix == ".json":
            shutil.copy2(f, config_dir / f.name)
    assert not any(config_dir.glob("*.safetensors"))
    report = cuda_check.main([*SMALL, "--random-smollm2", str(config_dir),
                              "--variants", "none:float32"])
    assert report["model"]["random_weights"] and "mean nothing" in report["model"]["note"]
    assert report["model"]["hidden_size"] == 64
    assert all(r["loss_finite"] and r["adapter_change_norm"] > 0 for r in report["runs"])


def test_the_names_it_takes_from_the_client_exist():
    p = cuda_check.project()
    assert all(callable(getattr(p, name)) for name in vars(p))
