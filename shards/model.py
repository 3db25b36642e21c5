"""The sub-model family: a small classifier over a shard's stored feature vectors.

A family's builder is a function ``ModelSpec -> torch.nn.Module`` registered under a name
(the whole plug-in interface — training step, checkpoint state, scoring — is
``shards.families.ModelFamily``);
the default ``mlp`` is ``Linear(d, h1) -> ReLU -> ... -> Linear(h_k, C)``
(``hidden=()`` gives multinomial logistic regression). The module must map a
float32 batch ``(n, d)`` to logits ``(n, C)``.

Initial weights come from ``init_seed`` alone: the builder runs inside a forked
torch RNG seeded with it, so any family that initialises through torch's usual
``reset_parameters`` is deterministic without knowing about seeds.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

ModelBuilder = Callable[["ModelSpec"], nn.Module]
_FAMILIES: dict[str, ModelBuilder] = {}


@dataclass(frozen=True)
class ModelSpec:
    """What to build: family name, input and output sizes, and family options.

    ``num_classes`` is fixed up front (never inferred from a shard's labels):
    removing every record of one class must not change the output layer.
    """

    input_dim: int
    num_classes: int
    family: str = "mlp"
    hidden: tuple[int, ...] = (128,)
    dropout: float = 0.0
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.input_dim < 1:
            raise ValueError(f"input_dim must be positive, got {self.input_dim}; use the feature dimension")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {self.num_classes}; count the label values")
        if any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden sizes must be positive, got {self.hidden}; use () for a linear model")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        object.__setattr__(self, "options", dict(self.options))
        json.dumps(dict(self.options))  # options must be JSON-serialisable: they are part of the content address

    def to_dict(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "input_dim": self.input_dim,
            "num_classes": self.num_classes,
            "hidden": list(self.hidden),
            "dropout": self.dropout,
            "options": dict(self.options),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        return cls(
            input_dim=int(data["input_dim"]),
            num_classes=int(data["num_classes"]),
            family=str(data["family"]),
            hidden=tuple(int(h) for h in data["hidden"]),
            dropout=float(data["dropout"]),
            options=dict(data.get("options", {})),
        )


def register_model_family(name: str, builder: ModelBuilder) -> None:
    """Make ``ModelSpec(family=name)`` build with ``builder``."""
    if name in _FAMILIES and _FAMILIES[name] is not builder:
        raise ValueError(f"model family {name!r} is already registered; pick another name")
    _FAMILIES[name] = builder


def model_families() -> tuple[str, ...]:
    return tuple(sorted(_FAMILIES))


def registered_builder(name: str) -> ModelBuilder | None:
    return _FAMILIES.get(name)


def build_model(spec: ModelSpec, init_seed: int, device: torch.device | str = "cpu") -> nn.Module:
    """A freshly initialised model; equal ``(spec, init_seed)`` give bitwise equal weights."""
    builder = _FAMILIES.get(spec.family)
    if builder is None:  # a family from shards.families: the built-in lm or an installed package's entry point
        from shards.families import family_named

        builder = family_named(spec.family).build
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(init_seed)
        model = builder(spec)
    return model.to(device)


def build_mlp(spec: ModelSpec) -> nn.Module:
    layers: list[nn.Module] = []
    width = spec.input_dim
    for size in spec.hidden:
        layers.append(nn.Linear(width, size))
        layers.append(nn.ReLU())
        if spec.dropout:
            layers.append(nn.Dropout(spec.dropout))
        width = size
    layers.append(nn.Linear(width, spec.num_classes))
    return nn.Sequential(*layers)


register_model_family("mlp", build_mlp)
