"""Storage by URL: what a shared S3-compatible store costs against the local home.

One run, the same demo data (``shards.demo_data``, hashing embedder) and SQLite database kind
for both: ingest and training with the home only, then with ``ERASURE_STORAGE_URL`` on moto's
S3 server (``tests/s3_server.py``, in-process: network and disk of this machine, no real
object store latency); then a "worker" whose home starts empty gets every shard version ready
to locate in: from the store (Parquet + the locate index tar, both verified), against rebuilding
the indexes from the Parquet files (what a worker would do without index objects).

Figures (one JSON document on stdout): seconds per phase and mode, the ratios s3/local, bytes
in the bucket, and the cold-worker fetch vs rebuild ratio. moto keeps objects in memory: the
ratios show our overhead (hashing, uploads, copies), not a real network's.

A warm-up ingest and training on a throwaway home runs first (imports, torch's first kernels).

Run: ``python benchmarks/bench_storage.py [--records N] [--shards S]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SECRET = "bench-storage-secret-0123456789abcdef"


def _phase(label: str, fn):  # noqa: ANN001, ANN202
    print(f"{label} ...", file=sys.stderr)
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=5000)
    parser.add_argument("--shards", type=int, default=4)
    args = parser.parse_args()

    from db.session import unit_of_work
    from db.settings import Settings
    from pipeline.database import open_database
    from pipeline.erasure import dataset_or_fail
    from pipeline.ingest import IngestOptions, ingest_source_file
    from pipeline.locate import build_and_save_index, current_indexes, dataset_embedder, dataset_minhash
    from pipeline.training import list_shards, publish_trained_members, train_one_shard
    from shards.demo_data import write_demo
    from shards.sources import FieldMap
    from shards.store import ShardStore
    from tests.s3_server import running_s3_server

    fields = FieldMap(id_field="id", text_field="text", label_field="label",
                      identifier_fields=(("email", "email"), ("user_id", "user_id"), ("name", "name")))
    options = {"epochs": 1.0, "hidden": [16], "batch_size": 64}
    figures: dict = {"records": args.records, "shards": args.shards, "server": "moto (in-process S3 API)"}
    with tempfile.TemporaryDirectory() as tmp, running_s3_server() as s3:
        root = Path(tmp)
        files = write_demo(root / "sources", args.records, seed=0)
        bucket = s3.new_bucket()
        modes = {
            "local": Settings(home=root / "local", secret_key=SECRET),
            "s3": Settings(home=root / "api", secret_key=SECRET, storage_url=f"s3://{bucket}/bench",
                           s3_endpoint_url=s3.endpoint_url, database_url=f"sqlite:///{root / 'shared.db'}"),
        }
        # warm-up (imports, torch's first kernels) on a throwaway home, so that neither mode pays it
        warm = Settings(home=root / "warm", secret_key=SECRET)
        warm_files = write_demo(root / "warm-sources", 300, seed=1)
        ingest_source_file(warm_files.records, IngestOptions(dataset="warm", fields=fields, n_shards=2, n_slices=3), warm)
        publish_trained_members(warm, "warm", [train_one_shard(warm, "warm", s, options) for s in list_shards(warm, "warm")])
        for mode, settings in modes.items():
            ingest = IngestOptions(dataset="demo", fields=fields, n_shards=args.shards, n_slices=3)
            figures[f"{mode}_ingest_s"], _ = _phase(f"{mode} ingest",
                                                    lambda: ingest_source_file(files.records, ingest, settings))
            figures[f"{mode}_train_s"], _ = _phase(f"{mode} train", lambda: publish_trained_members(
                settings, "demo", [train_one_shard(settings, "demo", s, options) for s in list_shards(settings, "demo")]))
        for phase in ("ingest", "train"):
            figures[f"{phase}_s3_over_local"] = round(figures[f"s3_{phase}_s"] / figures[f"local_{phase}_s"], 3)
        import boto3

        from tests.s3_server import _boto_credentials

        client = boto3.client("s3", endpoint_url=s3.endpoint_url, **_boto_credentials())
        figures["bucket_bytes"] = sum(o["Size"] for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket) for o in page.get("Contents", []))

        worker = modes["s3"].model_copy(update={"home": root / "worker"})
        engine = open_database(worker)

        def cold_worker() -> int:
            with unit_of_work(engine) as session:
                indexes, _, _ = current_indexes(worker, session, dataset_or_fail(session, "demo"))
            return len(indexes)

        figures["cold_worker_fetch_s"], _ = _phase("cold worker: fetch versions + index objects", cold_worker)

        def rebuild() -> int:
            store = ShardStore(worker.shards_dir)
            with unit_of_work(engine) as session:
                dataset = dataset_or_fail(session, "demo")
                embedder = dataset_embedder(dataset.embedder, dataset.feature_dim)
            minhash = dataset_minhash(worker, "demo")
            refs = [store.latest("demo", s) for s in range(args.shards)]
            for ref in refs:
                build_and_save_index(ref, embedder, minhash, overwrite=True)
            return len(refs)

        figures["rebuild_indexes_s"], _ = _phase("rebuild the same indexes from Parquet", rebuild)
        figures["fetch_over_rebuild"] = round(figures["cold_worker_fetch_s"] / figures["rebuild_indexes_s"], 3)
    for key, value in figures.items():
        if key.endswith("_s"):
            figures[key] = round(value, 3)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
