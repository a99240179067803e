"""What a client process keeps between rounds: its model and its clients' tokenised data.

Flower calls the ClientApp afresh each round, so the loaded base model with its LoRA
adapter and the tokenised data are kept at module level. One model per process is
shared by the clients it serves in turn (a simulation's actor): the round overwrites
the whole adapter before every use. Tokenised data is kept per client (small), so that
switching clients costs neither a model load nor a re-tokenisation. What must outlive
the process (the privacy ledger) lives in the client's state folder instead.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from client import data as data_mod
from client import frozen_prefix, tasks
from client.adapter import adapter_config_json, attach_for_strategy
from client.base_model import (
    Quantization,
    choose_quantization,
    count_params,
    load_base,
    pick_device,
    prepare_base,
)
from client.energy import EnergyMeter
from client.profiles import DeviceProfile, profile
from client.settings import ClientSettings

log = logging.getLogger("fedslm")


@dataclass(frozen=True)
class LoadedModel:
    model: Any  # a PeftModel
    tokenizer: Any
    quantization: Quantization
    source: str


@dataclass(frozen=True)
class ClientData:
    client: str
    train: data_mod.Examples
    heldout: data_mod.Examples
    task: tasks.EncodedTask | None = None  # the items of `eval-task` this client evaluates


@dataclass
class Session:
    """One client's view of the process cache in a round."""

    key: tuple
    loaded: LoadedModel
    data: ClientData
    adapter_config: str
    profile: DeviceProfile

    @property
    def model(self) -> Any:  # a PeftModel
        return self.loaded.model

    @property
    def quantization(self) -> Quantization:
        return self.loaded.quantization

    @property
    def client(self) -> str:
        return self.data.client

    @property
    def train(self) -> data_mod.Examples:
        return self.data.train

    @property
    def heldout(self) -> data_mod.Examples:
        return self.data.heldout

    @property
    def task(self) -> tasks.EncodedTask | None:
        return self.data.task

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer

    @property
    def on_gpu(self) -> bool:
        return next(self.model.parameters()).device.type == "cuda"

    _current: ClassVar[Session | None] = None
    _model: ClassVar[tuple[tuple, LoadedModel] | None] = None
    _data: ClassVar[dict[tuple, ClientData]] = {}
    MAX_CLIENTS_CACHED: ClassVar[int] = 64

    @classmethod
    def forget(cls) -> None:
        """Drop everything this process holds, as a fresh process would start."""
        cls._current, cls._model, cls._data = None, None, {}

    @classmethod
    def loaded_model(cls) -> LoadedModel | None:
        return cls._model[1] if cls._model else None

    @classmethod
    def get(cls, s: ClientSettings) -> Session:
        """The session of this round's client, loading what the process does not hold."""
        device_profile = profile(s.device_profile)
        threads = s.threads or device_profile.threads
        model_key = (s.model, s.quantization, s.device, s.lora_r, s.lora_alpha, s.lora_dropout,
                     s.lora_targets, s.lora_layers, s.seed, threads, s.strategy)
        data_key = (s.data, s.partition, s.seq_len, s.max_eval_seqs, s.canary_file, s.client,
                    s.frozen_cache, s.completion_only, s.eval_task, s.max_task_items,
                    file_stamp(s.data), file_stamp(s.eval_task))
        key = (model_key, data_key, s.device_profile)
        if cls._current is not None and cls._current.key == key:
            return cls._current
        cls._current = None
        loaded = cls._model_for(model_key, s, threads)
        device = next(loaded.model.parameters()).device
        data = cls._data_for(data_key, s, loaded, device)
        # the model as the run named it: a cache path would tell the server this device's
        # folders (the adapter config leaves the device with every reply)
        cls._current = cls(key, loaded, data, adapter_config_json(loaded.model, s.model),
                           device_profile)
        return cls._current

    @classmethod
    def _model_for(cls, model_key: tuple, s: ClientSettings, threads: int) -> LoadedModel:
        if cls._model is None or cls._model[0] != model_key:
            cls._model, cls._data = None, {}  # free the old model (and its tokenisation)
            gc.collect()
            if threads:
                torch.set_num_threads(threads)
            cls._model = (model_key, load_model(s))
        return cls._model[1]

    @classmethod
    def _data_for(cls, data_key: tuple, s: ClientSettings, loaded: LoadedModel,
                  device: torch.device) -> ClientData:
        if data_key not in cls._data:
            if len(cls._data) >= cls.MAX_CLIENTS_CACHED:
                cls._data.pop(next(iter(cls._data)))
            name, train_set, heldout = load_data(s, loaded.tokenizer)
            train_set, heldout = train_set.to(device), heldout.to(device)
            if s.frozen_cache:
                train_set, heldout = with_frozen_prefix(loaded.model, name, train_set, heldout)
            task = load_task(s, name, loaded.tokenizer)
            cls._data[data_key] = ClientData(name, train_set, heldout, task)
            quant = loaded.quantization
            log.info("client %s: %d train / %d held-out sequences%s, quantization %s (%s)",
                     name, len(train_set), len(heldout),
                     f", {len(task)} task items" if task else "", quant.mode, quant.reason)
        return cls._data[data_key]

    def energy_meter(self) -> EnergyMeter:
        return EnergyMeter(self.profile.watts_per_core, gpu=self.on_gpu)


def load_model(s: ClientSettings) -> LoadedModel:
    """The base model with this strategy's LoRA adapter, its tokenizer, the quantization
    used and the model's source."""
    source = prepare_base(s.model, Path(s.cache_dir) if s.cache_dir else None)
    device = pick_device(s.device)
    quant = choose_quantization(s.quantization, device, count_params(source))
    base, tokenizer = load_base(source, quant, device)
    model = attach_for_strategy(base, s.strategy, s.lora_r, s.lora_alpha, s.lora_dropout,
                                list(s.lora_targets), s.seed, s.lora_layers)
    return LoadedModel(model, tokenizer, quant, source)


def with_frozen_prefix(model: Any, client: str, *sets: data_mod.Examples
                       ) -> tuple[data_mod.Examples, ...]:
    """The sets with their frozen lower layers' outputs attached, when the adapter leaves
    lower layers frozen (client/frozen_prefix.py); else unchanged."""
    layer = frozen_prefix.first_trained_layer(model)
    if layer == 0:
        return sets
    model.eval()
    out = tuple(e.with_prefix(frozen_prefix.lower_outputs(model, e.input_ids, e.attention_mask,
                                                          layer), layer) for e in sets)
    total = len(frozen_prefix.decoder_of(model).layers)
    log.info("client %s: %s (%.0f MB)", client,
             frozen_prefix.describe(layer, total, len(sets[0]), len(sets[-1])),
             sum(e.prefix.numel() * e.prefix.element_size() for e in out) / 1e6)
    return out


def file_stamp(spec: str) -> tuple[int, int] | None:
    """(modification time, size) of a data or task file, so that a process that keeps a
    client's data (a deployed worker) reads a file edited between runs afresh."""
    path = Path(spec).expanduser()
    if not spec or not path.is_file():
        return None
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_size


def load_task(s: ClientSettings, name: str, tokenizer: Any) -> tasks.EncodedTask | None:
    """The items of `eval-task` this client evaluates (named by its node or its data
    partition), tokenised; None without a task. TaskError for a bad task file."""
    if not s.eval_task:
        return None
    names = {name}
    if s.client:  # the node renamed itself; its items may still name its data partition
        names.add(data_mod.partition(s.data, s.partition).client)
    items = tasks.load(s.eval_task, names)
    if s.max_task_items:
        items = items[:s.max_task_items]
    if not items:
        log.warning("client %s: task %s has no items for this client", name, s.eval_task)
        return None
    return tasks.encode(items, tokenizer)


def load_data(s: ClientSettings, tokenizer: Any
              ) -> tuple[str, data_mod.Examples, data_mod.Examples]:
    """This client's name and its (train, held-out) examples."""
    part = data_mod.partition(s.data, s.partition)
    train_set, heldout = data_mod.encode(part, tokenizer, s.seq_len, s.max_eval_seqs,
                                         s.completion_only)
    if s.canary_file:  # an empirical privacy audit (simulations/canaries.py)
        canaries = data_mod.planted_canaries(s.canary_file, s.partition, tokenizer, s.seq_len)
        if canaries is not None:
            train_set = data_mod.concat(train_set, canaries)
    return s.client or part.client, train_set, heldout
