"""``erasure evaluate`` and ``erasure predict``: use the ensemble in service on a file;
``erasure generate``: continue a prompt with an lm ensemble, behind the erasure screens.

``register_commands(app)`` mounts them on the main ``erasure`` app.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from api.cli_common import DbOpt, HomeOpt, JsonOpt, settings_from_flags
from api.cli_common import emit as _emit
from api.cli_common import fail as _fail


def register_commands(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate)
    app.command("predict")(predict)
    app.command("generate")(generate)


FileArg = Annotated[Path, typer.Argument(help="JSONL, CSV or Parquet file (read like ingest reads it).")]
DatasetOpt = Annotated[str, typer.Option(help="Dataset whose ensemble in service scores the file.")]
IdOpt = Annotated[str, typer.Option(help="Field holding the record id.")]
TextOpt = Annotated[str, typer.Option(help="Field holding the text.")]
FormatOpt = Annotated[Optional[str], typer.Option("--format", help="jsonl, csv or parquet (default: from the suffix).")]


def evaluate(
    file: FileArg,
    dataset: DatasetOpt = "default",
    id_field: IdOpt = "id",
    text_field: TextOpt = "text",
    label_field: Annotated[str, typer.Option(help="Field holding the label (integer or class name).")] = "label",
    format: FormatOpt = None,
    home: HomeOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Score the ensemble in service on a labelled FILE: accuracy, per class, per sub-model, and the
    monolithic baseline if one was trained (`erasure train --baseline`). Changes nothing."""
    from pipeline.evaluation import EvaluationInputError, evaluate_file
    from shards.sources import FieldMap, SourceError

    settings = settings_from_flags(home, database_url)
    try:
        result = evaluate_file(settings, dataset, file, fields=FieldMap(id_field, text_field, label_field, ()),
                               fmt=format)
    except (EvaluationInputError, SourceError, LookupError, ValueError) as exc:
        _fail(str(exc))
    lines = [f"{result['records']} record(s) of {file.name}: accuracy {result['accuracy']:.2%} "
             f"(ensemble {result['ensemble_version'][:12]}, {result['aggregation']})"]
    baseline = result["baseline"]
    if baseline is not None:
        lines.append(f"  monolithic baseline {baseline['id']}: {baseline['accuracy']:.2%} "
                     f"(ensemble {-baseline['ensemble_gap_points']:+.2f} points)")
    else:
        lines.append("  no baseline (train one with `erasure train --baseline` to compare)")
    for row in result["per_class"]:
        recall = "n/a" if row["recall"] is None else f"{row['recall']:.2%}"
        precision = "n/a" if row["precision"] is None else f"{row['precision']:.2%}"
        lines.append(f"  {str(row['label']):24.24} support {row['support']:6}  recall {recall:>7}  "
                     f"precision {precision:>7}")
    _emit(result, as_json, "\n".join(lines))


def predict(
    file: FileArg,
    dataset: DatasetOpt = "default",
    out: Annotated[Optional[Path], typer.Option(help="Write JSONL predictions here (default: stdout).")] = None,
    id_field: IdOpt = "id",
    text_field: TextOpt = "text",
    format: FormatOpt = None,
    home: HomeOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Predict a label for every record of FILE with the ensemble in service; JSONL rows
    {"id", "label", "label_index", "confidence"} to --out (or stdout). Changes nothing."""
    import json

    from pipeline.evaluation import EvaluationInputError, predict_file
    from shards.sources import FieldMap, SourceError

    settings = settings_from_flags(home, database_url)
    try:
        result = predict_file(settings, dataset, file, out, fields=FieldMap(id_field, text_field, None, ()),
                              fmt=format)
    except (EvaluationInputError, SourceError, LookupError, ValueError) as exc:
        _fail(str(exc))
    if out is None and not as_json:
        for row in result["predictions"]:
            typer.echo(json.dumps(row, ensure_ascii=False))
        return
    _emit(result, as_json, f"{result['records']} prediction(s) written to {result.get('out')}")


def generate(
    prompt: Annotated[str, typer.Argument(help="The text to continue (screened first; never stored or logged).")],
    dataset: Annotated[str, typer.Option(help="Dataset whose lm ensemble in service generates.")] = "default",
    max_words: Annotated[int, typer.Option(help="Words to generate at most (1..64).")] = 16,
    home: HomeOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Continue PROMPT with the dataset's lm ensemble. A prompt carrying an erased subject's identifier, or
    near an erased record, is refused (exit code 3, with the reason code); a continuation near erased content
    is withheld (blocked). Both are counted in the audit log."""
    from pipeline.database import open_database
    from pipeline.generation import NotGenerative, generate_screened

    settings = settings_from_flags(home, database_url)
    engine = open_database(settings)
    try:
        result = generate_screened(settings, engine, dataset, prompt, max_words)
    except (LookupError, NotGenerative, ValueError) as exc:
        _fail(str(exc))
    finally:
        engine.dispose()
    from dataclasses import asdict

    if result.refused:
        human = f"refused: {result.reason} (the prompt matches erased data; nothing was generated)"
    elif result.blocked:
        human = "blocked: the continuation matched erased content and was withheld"
    else:
        human = result.continuation
    _emit(asdict(result), as_json, human)
    if result.refused:
        raise typer.Exit(3)
