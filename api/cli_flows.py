"""The commands that run Prefect flows: ``erasure train``, ``erasure request
process``, ``erasure retrain-pending`` and the whole-story ``erasure demo``.

Flows run in this process. They talk to ``PREFECT_API_URL`` when it is set (a
real server, where deployments and workers live), else to the server of an
``erasure up`` running for the same data home (``api/up_state.py``); without
either, Prefect starts a temporary server for the command, with its home under
``$ERASURE_HOME/prefect``.
Flags are exported to the environment first, because flows read their
settings from it (as flows on a worker do).

``register_commands(app)`` mounts them on the main ``erasure`` app.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from api.cli_common import DbOpt, HomeOpt, JsonOpt, settings_from_flags
from api.cli_common import emit as _emit
from api.cli_common import fail as _fail
from db.settings import Settings

DatasetOpt = Annotated[str, typer.Option(help="Dataset name.")]


def register_commands(app: typer.Typer) -> None:
    """Mount ``train``, ``retrain-pending``, ``demo`` and ``request process``."""
    from api.cli_requests import request_app

    app.command("train")(train)
    app.command("retrain-pending")(retrain_pending)
    app.command("demo")(demo)
    request_app.command("process")(process)


def _prepare(home: Path | None, database_url: str | None) -> Settings:
    """Settings from flags and environment, exported for the flows; Prefect's home
    defaults into the data home (before Prefect is imported)."""
    settings = settings_from_flags(home, database_url)
    os.environ["ERASURE_HOME"] = str(settings.home)
    os.environ["ERASURE_DATABASE_URL"] = settings.resolved_database_url
    if "PREFECT_API_URL" not in os.environ:
        use_running_server(settings)
    if "PREFECT_API_URL" not in os.environ and "PREFECT_HOME" not in os.environ:
        (settings.home / "prefect").mkdir(parents=True, exist_ok=True)
        os.environ["PREFECT_HOME"] = str(settings.home / "prefect")
    import flows.prefect_setup  # noqa: F401

    return settings


def use_running_server(settings: Settings) -> None:
    """Point this process at the Prefect server of an ``erasure up`` running for the same
    data home (its state file names it; it must answer): no temporary server then."""
    from api.up_state import running_state

    state = running_state(settings.home)
    if state is None:
        return
    os.environ["PREFECT_API_URL"] = state["prefect_api_url"]
    os.environ.setdefault("PREFECT_HOME", str(settings.home / "prefect-server"))


def train(
    dataset: DatasetOpt = "default",
    epochs: Annotated[float, typer.Option(
        help="Epochs of a single model over the whole dataset; under --budget par each sub-model makes as many "
             "updates (epochs x S over its shard), under per-shard it runs this many over its shard.")] = 4.0,
    budget: Annotated[str, typer.Option(
        help="par: the ensemble trains to par with one model (S times its training cost); per-shard: each "
             "sub-model gets 1/S of the updates (cheaper, less accurate).")] = "par",
    schedule: Annotated[str, typer.Option(
        help="How a sub-model's epochs spread over its slices: equal-samples (every slice the same samples: "
             "retraining from a late slice is cheap) or paper (equal epochs per slice).")] = "equal-samples",
    baseline: Annotated[bool, typer.Option(
        "--baseline", help="Also train one monolithic model with the same options, for `erasure evaluate` to "
                           "compare (never part of the ensemble; deleted when a person it saw is erased).")] = False,
    hidden: Annotated[list[int], typer.Option(help="Hidden layer width; repeat for more layers.")] = [64],  # noqa: B006
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 128,
    learning_rate: Annotated[float, typer.Option(help="Learning rate (Adam).")] = 2e-3,
    seed: Annotated[int, typer.Option(help="Training seed.")] = 0,
    family: Annotated[str, typer.Option(
        help="Model family (shards.families): mlp (classifier on the embeddings), lm (byte-level language model "
             "on the texts), or one an installed package declares in the erasure.model_families entry point group."
    )] = "mlp",
    block_size: Annotated[int, typer.Option(help="Bytes of each text an lm reads (text families only).")] = 256,
    home: HomeOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Train one SISA sub-model per shard (resuming from stored checkpoints) and publish the ensemble."""
    if baseline and family != "mlp":
        _fail(f"--baseline trains a monolithic classifier for the mlp family only; drop it with --family {family}")
    _prepare(home, database_url)
    from flows.training import train_ensemble

    try:
        result = train_ensemble(dataset, epochs=epochs, hidden=list(hidden), batch_size=batch_size,
                                learning_rate=learning_rate, seed=seed, budget=budget, schedule=schedule,
                                baseline=baseline, family=family, block_size=block_size)
    except (LookupError, ValueError) as exc:
        _fail(str(exc))
    _emit(result, as_json, f"ensemble {result['ensemble_version'][:12]} of {dataset!r}: {result['members']} sub-model(s)"
          + ("" if result["created"] else " (unchanged)")
          + (f"; baseline {result['baseline']['baseline_id']} ({result['baseline']['records_seen']} records)"
             if result.get("baseline") else ""))


def process(
    request_id: Annotated[str, typer.Argument(help="The request id (a UUID).")],
    dataset: Annotated[Optional[str], typer.Option(
        help="Only this dataset (default: every dataset, or those the request named).")] = None,
    retrain: Annotated[str, typer.Option(help="'now', or 'scheduled' to leave it to retrain-pending.")] = "now",
    review_timeout: Annotated[int, typer.Option(help="Seconds to wait paused for review decisions (0: do not wait).")] = 0,
    on_review_timeout: Annotated[str, typer.Option(help="leave (end, continue later), keep, erase or fail.")] = "leave",
    home: HomeOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Process a request: locate, review, erase, retrain, verify, complete. Rerunning resumes."""
    if retrain not in ("now", "scheduled"):
        _fail("--retrain is 'now' or 'scheduled'")
    if on_review_timeout not in ("leave", "keep", "erase", "fail"):
        _fail("--on-review-timeout is leave, keep, erase or fail")
    _prepare(home, database_url)
    from flows.process_request import process_erasure_request
    from pipeline.lifecycle import RequestError

    try:
        summary = process_erasure_request(request_id, dataset, retrain=retrain, review_timeout_s=review_timeout,
                                          on_review_timeout=on_review_timeout)
    except (RequestError, LookupError, ValueError) as exc:
        _fail(str(exc))
    human = (f"request {request_id}: {summary['state']}; {summary['matches']} match(es), {summary['erased']} erased, "
             f"{summary['kept']} kept, {len(summary['retraining'])} shard retraining(s)")
    _emit(summary, as_json, human)


def retrain_pending(
    dataset: Annotated[Optional[str], typer.Option(help="Only this dataset (default: all).")] = None,
    home: HomeOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Retrain every shard with pending removals once (earliest deadline first); complete the requests served."""
    _prepare(home, database_url)
    from flows.retraining import retrain_pending as run

    result = run(dataset)
    _emit(result, as_json, f"{len(result['retrained'])} retraining(s); {len(result['completed'])} request(s) completed")


def demo(
    records: Annotated[int, typer.Option(help="Number of demo records.")] = 1000,
    shards: Annotated[int, typer.Option(help="SISA shards.")] = 4,
    slices: Annotated[int, typer.Option(help="Slices per shard.")] = 4,
    embedder: Annotated[str, typer.Option(help="'minilm' (finds paraphrases) or 'hashing' (faster).")] = "minilm",
    epochs: Annotated[float, typer.Option(help="Training epochs (a single model's; the sub-models train to par).")] = 4.0,
    home: HomeOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The whole story: ingest demo data, train, erase one fictional person, retrain, verify."""
    settings = _prepare(home, database_url)
    from api.demo import run_full_demo
    from pipeline.progress import RichReporter

    with RichReporter() as reporter:
        result = run_full_demo(settings, records=records, shards=shards, slices=slices, reporter=reporter,
                               embedder=embedder, epochs=epochs)
    lines = [f"request {result['request_id']}: {result['state']}"]
    for method, row in result["found_by_method"].items():
        lines.append(f"  {method:11} found {row['found']:3}  erased {row['erased']:3}  kept {row['kept']:3}  "
                     f"(truly the subject's: {row['truly_the_subjects']})")
    estimate = result.get("retrain_estimate")
    if estimate is not None:
        lines.append(f"  estimate before erasing: {estimate['shards_touched']} shard(s) from slice(s) "
                     f"{estimate['earliest_slice']}, {estimate['samples']} samples "
                     f"({estimate['fraction']:.1%} of a full retrain)")
    for job in result["retraining"]:
        lines.append(f"  shard {job['shard']}: retrained from slice {job['retrained_from_slice']}, "
                     f"{job['samples_processed']} samples ({job['fraction_of_shard']:.0%} of the shard)")
    cost = result["cost"]
    if cost["fraction_of_full"] is not None:
        agrees = {True: "agrees with the estimate", False: "DIFFERS from the estimate", None: "no estimate"}
        lines.append(f"  cost: {cost['sisa_samples']} samples vs {cost['full_retrain_samples']} for a full retrain "
                     f"({cost['fraction_of_full']:.1%}; {agrees[cost.get('estimate_agrees')]})")
    audit = result["accountability"]
    for probe in audit["membership_probe"]:
        auc = ("n/a" if probe["auc"] is None else f"{probe['auc']:.3f} [{probe['ci_low']:.3f}, {probe['ci_high']:.3f}]")
        power = probe.get("power") or {}
        power_text = ("n/a" if power.get("auc") is None
                      else f"{power['auc']:.3f} [{power['ci_low']:.3f}, {power['ci_high']:.3f}]")
        lines.append(f"  membership probe {probe['role']:6}: AUC {auc} ({probe['erased_count']} erased records, "
                     f"{probe.get('groups') if probe.get('groups') is not None else 'n/a'} distinct texts, vs "
                     f"{probe['heldout_count']} never seen; reference-calibrated); power {power_text}")
    if audit.get("membership_sentence"):
        lines.append(f"  {audit['membership_sentence']}")
    certificate = audit["certificate"]
    if certificate is not None:
        lines.append(f"  certificate: {certificate['file']} (signed, key {certificate['key_id'][:16]}…, "
                     f"verified offline: {'yes' if certificate['verified_offline'] else 'NO'})")
        lines.append("  scope: " + "; ".join(f"{k.replace('_', ' ')}: {v}" for k, v in certificate["scope"].items()))
    log = audit["audit_log"]
    lines.append(f"  audit log: {log['events']} chained event(s), {'intact' if log['ok'] else 'BROKEN'}")
    if audit.get("residue"):
        from api.cli_audit import residue_lines

        lines += ["  " + line for line in residue_lines(audit["residue"]).splitlines()]
    _emit(result, as_json, "\n".join(lines))
