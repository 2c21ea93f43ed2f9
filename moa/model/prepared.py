"""The experiment's base model as every step after `moa prepare-model` loads it, and the device it runs on."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from moa.config import Config
from moa.errors import MoaError
from moa.layout import ExperimentPaths
from moa.model.config import DTYPES
from moa.model.llama import Transformer
from moa.model.load import DEFAULT_MODEL, RANDOM_PREFIX, load_pretrained
from moa.model.tokenizer import Tokenizer


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def provenance(config: Config) -> dict[str, object]:
    """What model/ depends on: random:PRESET models depend on the seed too."""
    return {"model": config["model"], "seed": config["seed"]}


def loads_offline(source: str) -> bool:
    """Whether `source` loads without the network: the packaged model, a random preset or a local path."""
    return source == DEFAULT_MODEL or source.startswith(RANDOM_PREFIX) or Path(source).expanduser().exists()


def base_model(config: Config) -> tuple[Transformer, Tokenizer]:
    """The prepared model/ when it was made from this config's model, else the source itself, loaded
    straight onto device()."""
    paths = ExperimentPaths.of(config)
    stamp = paths.model_source
    fresh = stamp.is_file() and json.loads(stamp.read_text()) == json.loads(json.dumps(provenance(config)))
    source = paths.model if fresh else config["model"]["source"]
    if not fresh and not loads_offline(source):  # compute nodes are often offline: only prepare-model downloads
        raise MoaError(f"{paths.model}: not prepared from model.source {source!r}, and no step after prepare-model "
                       "downloads; run `moa prepare-model --config ...` first (on a cluster: on the login node)")
    return load_pretrained(source, DTYPES[config["model"]["dtype"]], seed=config["seed"], device=device())
