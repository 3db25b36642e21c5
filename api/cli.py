"""The ``erasure`` command line. Thin: parse flags, call one function, print.

Every reporting command takes ``--json`` and then prints one JSON document on
stdout; progress bars go to stderr. Bad input exits with status 2 and a message.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Annotated, Optional

import typer

from api.cli_common import IDENTIFIER_HELP, DbOpt, HomeOpt, JsonOpt, parse_identifiers
from api.cli_common import emit as _emit
from api.cli_common import fail as _fail
from api.cli_common import settings_from_flags as _settings

app = typer.Typer(add_completion=False, no_args_is_help=True, help="GDPR erasure pipeline for ML training data.")
db_app = typer.Typer(no_args_is_help=True, help="Database schema.")
app.add_typer(db_app, name="db")

from api.cli_requests import register_commands  # noqa: E402

register_commands(app)

from api.cli_flows import register_commands as register_flow_commands  # noqa: E402

register_flow_commands(app)

from api.cli_audit import register_commands as register_audit_commands  # noqa: E402

register_audit_commands(app)

from api.cli_lineage import register_commands as register_lineage_commands  # noqa: E402

register_lineage_commands(app)

from api.cli_models import register_commands as register_model_commands  # noqa: E402

register_model_commands(app)

from api.cli_up import register_commands as register_up_commands  # noqa: E402

register_up_commands(app)



def _parse_identifier_fields(specs: list[str]) -> tuple[tuple[str, str], ...]:
    from dedup.identifiers import IDENTIFIER_KINDS

    parsed = []
    for spec in specs:
        field, _, kind = spec.partition(":")
        kind = kind or field
        if kind not in IDENTIFIER_KINDS:
            _fail(
                f"--identifier-field {spec!r}: {kind!r} is not a known identifier kind "
                f"({', '.join(IDENTIFIER_KINDS)}); name the kind as FIELD:KIND, e.g. contact:email"
            )
        parsed.append((field, kind))
    return tuple(parsed)


@app.command()
def ingest(
    file: Annotated[Path, typer.Argument(help="JSONL, CSV or Parquet file of records.")],
    dataset: Annotated[str, typer.Option(help="Dataset name.")] = "default",
    id_field: Annotated[str, typer.Option(help="Field holding the record id.")] = "id",
    text_field: Annotated[str, typer.Option(help="Field holding the text.")] = "text",
    label_field: Annotated[str, typer.Option(
        help="Field holding the label: integers, or class names (the dataset keeps their vocabulary).")] = "label",
    no_label: Annotated[bool, typer.Option("--no-label", help="The data has no labels.")] = False,
    allow_new_labels: Annotated[bool, typer.Option(
        "--allow-new-labels", help="Accept class names the dataset has not seen (they change the model's "
                                   "outputs); without it such a file is refused.")] = False,
    identifier_field: Annotated[
        list[str], typer.Option(help="Identifier field, FIELD or FIELD:KIND (kinds: email, user_id, name, phone). Repeatable.")
    ] = [],  # noqa: B006 - typer needs a literal default
    shards: Annotated[int, typer.Option(help="Number of SISA shards S (fixed per dataset).")] = 4,
    slices: Annotated[int, typer.Option(help="Number of slices R per shard (fixed per dataset).")] = 4,
    seed: Annotated[int, typer.Option(help="Placement seed (fixed per dataset).")] = 0,
    placement: Annotated[Optional[str], typer.Option(
        help="subject: a person's records (linked by email, user id or phone, and their near-copies) share one "
             "shard and one late slice, so their erasure retrains one sub-model; record: by record id. Fixed per "
             "dataset; default: subject when identifier fields are given.")] = None,
    max_records_per_identifier: Annotated[int, typer.Option(
        help="An identifier value on more records than this (a shared support address) links none of them.")] = 1000,
    format: Annotated[Optional[str], typer.Option("--format", help="jsonl, csv or parquet (default: from the suffix).")] = None,
    embedder: Annotated[
        str, typer.Option(help="Features/paraphrase embedder: 'hashing' (fast, words), 'minilm' (meaning) or "
                        "'minilm-int8' (the same model, int8 ONNX: several times faster, same neighbours).")
    ] = "hashing",
    home: HomeOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Validate FILE and ingest it: shards, slices, features, lineage."""
    from pipeline.ingest import IngestOptions, IngestValidationError, ShardChangedDuringIngest, ingest_source_file
    from pipeline.progress import RichReporter
    from shards.sources import FieldMap, SourceError

    settings = _settings(home, database_url)
    options = IngestOptions(
        dataset=dataset,
        fields=FieldMap(
            id_field=id_field,
            text_field=text_field,
            label_field=None if no_label else label_field,
            identifier_fields=_parse_identifier_fields(identifier_field),
        ),
        n_shards=shards,
        n_slices=slices,
        seed=seed,
        fmt=format,
        embedder=embedder,
        placement=placement,
        max_records_per_identifier=max_records_per_identifier,
        allow_new_labels=allow_new_labels,
    )
    try:
        with RichReporter() as reporter:
            summary = ingest_source_file(file, options, settings, reporter)
    except IngestValidationError as exc:
        _fail(str(exc))
    except (SourceError, ValueError) as exc:
        _fail(str(exc))
    except ShardChangedDuringIngest as exc:  # not bad input: a race; exit 1
        _fail(str(exc), code=1)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        # The ingest rolled back (no version published, no lineage row): nothing to clean up by hand.
        _fail(f"{exc}. Nothing was ingested: free space under {settings.home} and run the same command again",
              code=1)
    human = (
        f"{summary.status}: {summary.new_records} new record(s) of {summary.rows} row(s) into dataset "
        f"{summary.dataset!r} ({summary.shards} shards x {summary.slices} slices, placed by {summary.placement}) "
        f"in {summary.seconds:.1f}s"
    )
    _emit(summary.to_json(), as_json, human)


@app.command("demo-data")
def demo_data(
    directory: Annotated[Path, typer.Argument(help="Where to write records.jsonl and ground_truth.jsonl.")],
    records: Annotated[int, typer.Option(help="Number of records (1,000 to 1,000,000).")] = 2000,
    seed: Annotated[int, typer.Option(help="Generator seed.")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Generate the deterministic demo dataset with planted copies and ground truth."""
    from shards.demo_data import write_demo

    if records < 1:
        _fail("--records must be positive")
    files = write_demo(directory, records, seed)
    data = {
        "records": str(files.records),
        "ground_truth": str(files.ground_truth),
        "n_records": files.n_records,
        "n_persons": files.n_persons,
        "n_copies": files.n_copies,
    }
    _emit(data, as_json, f"demo data written to {directory}")


@app.command()
def locate(
    dataset: Annotated[str, typer.Option(help="Dataset name.")] = "default",
    identifier: Annotated[
        list[str], typer.Option("--identifier", "-i", help=IDENTIFIER_HELP)
    ] = [],  # noqa: B006
    sample: Annotated[list[str], typer.Option(help="A text the subject wrote. Repeatable.")] = [],  # noqa: B006
    sample_file: Annotated[list[Path], typer.Option(help="A UTF-8 file holding one sample. Repeatable.")] = [],  # noqa: B006
    hops: Annotated[int, typer.Option(help="Second-hop depth: search from the found records' texts too.")] = 1,
    show_keep: Annotated[bool, typer.Option("--show-keep", help="Also list near misses decided 'keep'.")] = False,
    home: HomeOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Dry run: every record of a subject, by identifier, near-copy and paraphrase. Changes nothing."""
    from db.session import unit_of_work
    from dedup.locate import LocateRequest
    from pipeline.database import open_database
    from pipeline.locate import locate_dry_run
    from pipeline.placement import matches_retrain_estimate

    settings = _settings(home, database_url)
    try:
        request = LocateRequest.parse(parse_identifiers(identifier), sample, [str(p) for p in sample_file])
        with unit_of_work(open_database(settings)) as session:
            result = locate_dry_run(settings, session, dataset, request, hops=hops, report_keep=show_keep)
            estimate = matches_retrain_estimate(settings, session, dataset, result.matches)
    except (ValueError, LookupError, OSError) as exc:
        _fail(str(exc))
    data = {"dataset": dataset, **result.to_dict(), "retrain_estimate": estimate}
    by_method: dict[str, int] = {}
    for match in result.matches:
        by_method[match.method.value] = by_method.get(match.method.value, 0) + 1
    data["by_method"] = by_method
    lines = [f"{len(result.matches)} match(es) in {dataset!r}: " + ", ".join(f"{k} {v}" for k, v in data["counts"].items())]
    for match in result.matches:
        lines.append(
            f"  {match.decision.value:6} shard {match.shard} slice {match.slice} {match.record_id}  "
            f"{match.method.value} {match.metric.value}={match.score:.3f} (hop {match.hop})"
        )
        if match.paraphrase is not None:  # what a reviewer judges a paraphrase by
            ev = match.paraphrase
            spans = "; ".join(f"'{s}'" for s in ev.shared_spans[:3]) or "none"
            lead = f", lead {ev.lead:.3f} over the runner-up" if ev.rank == 1 else ""
            lines.append(f"         margin {ev.margin:.3f}, rank {ev.rank} among the query's neighbours{lead}, "
                         f"shared spans: {spans}")
    lines.append(f"erasing the 'erase' matches would retrain {estimate['shards_touched']} shard(s) from slice(s) "
                 f"{estimate['earliest_slice']}: {estimate['samples']} samples, {estimate['fraction']:.1%} of a full "
                 "retraining")
    _emit(data, as_json, "\n".join(lines))


@app.command("shards")
def list_shards(
    dataset: Annotated[str, typer.Option(help="Dataset name.")] = "default",
    home: HomeOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List a dataset's recorded shard versions."""
    from pipeline.reports import shard_report

    settings = _settings(home, database_url)
    try:
        report = shard_report(settings, dataset)
    except LookupError as exc:
        _fail(str(exc))
    lines = [f"dataset {dataset}: {len(report['shards'])} shard(s)"]
    for entry in report["shards"]:
        lines.append(f"  shard {entry['shard']}: version {entry['version']}, {entry['row_count']} rows, {entry['path']}")
    _emit(report, as_json, "\n".join(lines))


@db_app.command("upgrade")
def db_upgrade(home: HomeOpt = None, database_url: DbOpt = None, as_json: JsonOpt = False) -> None:
    """Create or upgrade the schema (alembic upgrade head)."""
    from db.session import upgrade_to_head

    settings = _settings(home, database_url)
    upgrade_to_head(settings.resolved_database_url)
    url = settings.resolved_database_url
    _emit({"upgraded": True, "database": url.split("@")[-1]}, as_json, "schema is at head")



@db_app.command("rekey")
def db_rekey(
    dataset: Annotated[Optional[str], typer.Option("--dataset", help="Only this dataset (default: all).")] = None,
    drop_unkeyed_tombstones: Annotated[bool, typer.Option(
        "--drop-unkeyed-tombstones",
        help="Delete a tombstone file from before keyed signatures (it confirms guessed erased texts to anyone "
             "holding it and cannot be re-keyed); re-ingests of those texts are then no longer screened out.")] = False,
    home: HomeOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Bring data from before keyed digests under the secret key: content HMACs of live records,
    keyed locate indexes, unkeyed tombstones dropped on request, database files compacted."""
    from pipeline.locate import UnkeyedTombstoneFile
    from pipeline.rekey import rekey_all, rekey_dataset

    settings = _settings(home, database_url)
    try:
        if dataset is not None:
            reports = [rekey_dataset(settings, dataset, drop_unkeyed_tombstones=drop_unkeyed_tombstones)]
        else:
            reports = rekey_all(settings, drop_unkeyed_tombstones=drop_unkeyed_tombstones)
    except (LookupError, ValueError, UnkeyedTombstoneFile) as exc:
        _fail(str(exc))
    data = {"datasets": [r.to_dict() for r in reports]}
    lines = [f"{r.dataset}: {r.records_rekeyed} record digest(s) keyed, {r.indexes_rebuilt} index(es) rebuilt, "
             f"{r.unkeyed_tombstones_dropped} unkeyed tombstone(s) dropped" for r in reports] or ["no datasets"]
    _emit(data, as_json, "\n".join(lines))


if __name__ == "__main__":
    app()
