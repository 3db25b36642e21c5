"""Model families as plug-ins: one from another installed package is found by its entry point and trains
exactly under SISA like the built-ins."""

from __future__ import annotations

import textwrap

import pytest

from shards import families, model
from shards.checkpoints import CheckpointStore
from shards.training import SliceSchedule, TrainConfig, train_shard

PLUGIN = '''
from torch import nn
from shards.families import ModelFamily
from shards.model import ModelSpec


class BilinearFamily(ModelFamily):
    name = "acme-bilinear"

    def build(self, spec):
        rank = spec.options["rank"]
        return nn.Sequential(nn.Linear(spec.input_dim, rank), nn.Linear(rank, spec.num_classes))

    def example_spec(self):
        return ModelSpec(6, 3, family="acme-bilinear", hidden=(), options={"rank": 2})
'''


@pytest.fixture
def installed_plugin(tmp_path, monkeypatch):
    """A package ``acme_models`` installed on sys.path with an ``erasure.model_families`` entry point."""
    (tmp_path / "acme_models.py").write_text(textwrap.dedent(PLUGIN))
    dist = tmp_path / "acme_models-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-models\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[erasure.model_families]\nacme-bilinear = acme_models:BilinearFamily\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(families, "_FAMILIES", dict(families._FAMILIES))
    monkeypatch.setattr(model, "_FAMILIES", dict(model._FAMILIES))
    monkeypatch.setattr(families, "_entry_points_loaded", False)
    return "acme-bilinear"


def test_a_family_of_another_package_is_found_and_trains_exactly(installed_plugin, tmp_path):
    assert installed_plugin in families.family_names()
    family = families.family_named(installed_plugin)
    assert type(family).__module__ == "acme_models"
    from tests.unit.test_sisa_exactness import check_exact, make_family_shard

    spec = family.example_spec()
    shard = make_family_shard(spec, "s", 20, 3, 5)
    config = TrainConfig(model=spec, schedule=SliceSchedule.paper(3, 2), batch_size=4)
    check_exact(shard, {shard.record_ids[7], shard.record_ids[12]}, config, tmp_path / "exact")


def test_an_unknown_family_names_the_known_ones(installed_plugin, tmp_path):
    spec = families.family_named("mlp").example_spec()
    bad = TrainConfig(model=type(spec)(6, 3, family="nope"), schedule=SliceSchedule.paper(1, 1))
    from tests.unit.test_sisa_exactness import make_family_shard

    with pytest.raises(ValueError, match="unknown model family 'nope'; known: acme-bilinear, lm, mlp"):
        train_shard(make_family_shard(spec, "s", 4, 1, 0), bad, CheckpointStore(tmp_path))


def test_a_family_with_a_mismatched_entry_point_name_is_refused(tmp_path, monkeypatch, installed_plugin):
    dist = next(tmp_path.glob("*.dist-info"))
    (dist / "entry_points.txt").write_text("[erasure.model_families]\nother = acme_models:BilinearFamily\n")
    with pytest.raises(ValueError, match="make them equal"):
        families.load_entry_points()
