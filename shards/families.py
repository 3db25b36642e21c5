"""Model families: the plug-in interface a sub-model's kind implements, and their registry.

A family says how to build a model from a spec, which columns of a shard it trains on,
how one slice trains from a batch iterator, what its checkpoint state is, and how it scores
and predicts. The SISA loop (``shards.training``) owns everything that makes retraining
exact — initial seed, batch order, layer seeding, checkpoint addresses — so a family only
has to be deterministic given the batches it is handed (no global RNG of its own beyond
torch's default generator, which the loop seeds before every epoch).

Families are found by name: the built-in ``mlp`` (``shards.model``) and ``lm``
(``shards.lm``), anything registered with :func:`register_family`, and any installed
package that declares an entry point in the group ``erasure.model_families``::

    [project.entry-points."erasure.model_families"]
    mine = "my_package.models:MY_FAMILY"     # a ModelFamily instance, or a class to instantiate

A plain builder registered with ``shards.model.register_model_family`` becomes a classifier
family with the MLP's training step (cross-entropy on features and labels).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shards import model as model_registry
from shards.model import ModelSpec

if TYPE_CHECKING:
    from shards.training import ShardData

ENTRY_POINT_GROUP = "erasure.model_families"

Batch = Mapping[str, torch.Tensor]  # a family's columns (see ``ModelFamily.columns``) at one batch's rows


class ModelFamily:
    """The interface. Subclass it and override what differs from a classifier over feature vectors.

    ``uses_texts``: the family trains on record texts, so the texts are part of each slice's
    content address (``shards.training.checkpoint_chain``) and must be loaded with the shard.
    """

    name: ClassVar[str] = ""
    uses_texts: ClassVar[bool] = False
    uses_labels: ClassVar[bool] = True  # False: unlabelled records train too (their label reads as 0)
    kind: ClassVar[str] = "classifier"  # or "generative": what /v1/predict and /v1/generate serve

    def build(self, spec: ModelSpec) -> nn.Module:
        """A fresh module; called inside a torch RNG seeded with the init seed (``shards.model.build_model``)."""
        raise NotImplementedError

    def example_spec(self) -> ModelSpec:
        """A small spec that trains in milliseconds: what the exactness property test runs every family with."""
        raise NotImplementedError(f"family {self.name!r} has no example_spec; define one so the exactness "
                                  "property test (tests/unit/test_sisa_exactness.py) can cover it")

    def check(self, shard: ShardData, spec: ModelSpec) -> None:
        """Raise ``ValueError`` (saying what to do) when ``shard`` cannot train under ``spec``."""
        if shard.num_records and shard.feature_dim != spec.input_dim:
            raise ValueError(
                f"shard {shard.shard_id} has {shard.feature_dim}-dimensional features but the model expects "
                f"{spec.input_dim}; embed with the same embedder as at ingest "
                f"or set ModelSpec(input_dim={shard.feature_dim})"
            )
        if shard.num_records:
            bad_label = (shard.labels < 0) | (shard.labels >= spec.num_classes)
            if bad_label.any():
                raise ValueError(
                    f"shard {shard.shard_id} has labels outside 0..{spec.num_classes - 1} "
                    f"(e.g. {int(shard.labels[bad_label][0])}); set ModelSpec(num_classes=...) to the label count"
                )

    def columns(self, shard: ShardData, spec: ModelSpec, device: torch.device) -> dict[str, torch.Tensor]:
        """The shard's training columns as tensors with one row per record (indexed by batch rows)."""
        return {"features": torch.from_numpy(shard.features).to(device),
                "labels": torch.from_numpy(shard.labels).to(device)}

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The mean training loss of one batch."""
        return F.cross_entropy(model(batch["features"]), batch["labels"])

    def train_slice(self, model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable[Batch]) -> None:
        """Train on every batch of one slice (all its epochs), in the order given."""
        for batch in batches:
            loss = self.loss(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    def state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """What a checkpoint stores of the model and its optimizer (tensors on the CPU)."""
        return {"model_state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                "optimizer_state": optimizer.state_dict()}

    def load_state(self, payload: Mapping[str, Any], model: nn.Module,
                   optimizer: torch.optim.Optimizer | None = None) -> None:
        model.load_state_dict(payload["model_state"])
        if optimizer is not None:
            optimizer.load_state_dict(payload["optimizer_state"])

    @torch.no_grad()
    def score(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Per-record loss (n,): what the membership probe and held-out evaluation read."""
        return F.cross_entropy(model(batch["features"]), batch["labels"], reduction="none")

    @torch.no_grad()
    def predict(self, model: nn.Module, batch: Batch) -> np.ndarray:
        """Class probabilities (n, C) of a classifier."""
        return torch.softmax(model(batch["features"]), dim=1).cpu().numpy()


class BuilderFamily(ModelFamily):
    """A classifier family from a plain ``ModelSpec -> nn.Module`` builder (the MLP's training step)."""

    def __init__(self, name: str, builder: model_registry.ModelBuilder) -> None:
        self._name = name
        self._builder = builder

    @property
    def name(self) -> str:  # type: ignore[override]
        return self._name

    def build(self, spec: ModelSpec) -> nn.Module:
        return self._builder(spec)


_FAMILIES: dict[str, ModelFamily] = {}
_entry_points_loaded = False


def register_family(family: ModelFamily) -> ModelFamily:
    """Make ``ModelSpec(family=family.name)`` train with ``family``; returns it (usable as a decorator on instances)."""
    name = family.name
    if not name:
        raise ValueError("a model family needs a non-empty name; set the class attribute `name`")
    known = _FAMILIES.get(name)
    if known is not None and known is not family:
        raise ValueError(f"model family {name!r} is already registered; pick another name")
    _FAMILIES[name] = family
    model_registry.register_model_family(name, family.build)
    return family


def load_entry_points() -> list[str]:
    """Register the families that installed packages declare in ``erasure.model_families``; their names."""
    global _entry_points_loaded
    names = []
    for point in entry_points(group=ENTRY_POINT_GROUP):
        if point.name in _FAMILIES:
            names.append(point.name)
            continue
        loaded = point.load()
        family = loaded() if isinstance(loaded, type) else loaded
        if not isinstance(family, ModelFamily):
            raise TypeError(f"entry point {point.name} = {point.value} is not a shards.families.ModelFamily; "
                            "point it at an instance or subclass")
        if family.name != point.name:
            raise ValueError(f"entry point {point.name} names a family called {family.name!r}; make them equal")
        register_family(family)
        names.append(point.name)
    _entry_points_loaded = True
    return names


def family_named(name: str) -> ModelFamily:
    """The registered family ``name`` (built-ins, entry points, ``register_family``, legacy builders)."""
    if name in _FAMILIES:
        return _FAMILIES[name]
    if name not in _FAMILIES and not _entry_points_loaded:
        load_entry_points()
    if name in _FAMILIES:
        return _FAMILIES[name]
    builder = model_registry.registered_builder(name)
    if builder is not None:  # registered through shards.model.register_model_family only
        family = BuilderFamily(name, builder)
        _FAMILIES[name] = family
        return family
    raise ValueError(f"unknown model family {name!r}; known: {', '.join(family_names())} (install a package with an "
                     f"{ENTRY_POINT_GROUP!r} entry point, or register one with shards.families.register_family)")


def family_names() -> tuple[str, ...]:
    """Every family that can be named now, entry points included."""
    if not _entry_points_loaded:
        load_entry_points()
    return tuple(sorted(set(_FAMILIES) | set(model_registry.model_families())))


class MLPFamily(ModelFamily):
    """The default classifier: ``shards.model.build_mlp`` trained with cross-entropy on feature vectors."""

    name = "mlp"

    def build(self, spec: ModelSpec) -> nn.Module:
        return model_registry.build_mlp(spec)

    def example_spec(self) -> ModelSpec:
        return ModelSpec(6, 3, hidden=(8,))


MLP_FAMILY = MLPFamily()
_FAMILIES["mlp"] = MLP_FAMILY  # shards.model registers build_mlp under "mlp" itself

from shards import lm as _lm  # noqa: E402,F401  (the built-in "lm" family registers itself; it imports this module)
