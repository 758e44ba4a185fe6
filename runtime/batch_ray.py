"""`sd-run batch --ray`: the batch's items through Ray Data, `map_batches` over a pool of actors that each load
the model once and run batch.run_item; results stream back to the driver, which alone writes OUTDIR (so
resume and atomic writes work as locally). Needs the `[ray]` extra."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import ray

from .batch import BatchItem, run_item
from .pipeline import StableDiffusionPipeline
from .ray_cluster import connect
from .request import Limits


class BatchWorker:
    """A Ray Data actor: one pipeline, items in, (record, PNG) out."""

    def __init__(self, folder: str, provider: str, threads: int, limits: dict[str, Any]) -> None:
        self.pipe = StableDiffusionPipeline.from_pretrained(folder, provider=provider, threads=threads)
        self.limits = Limits(**limits)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        records, pngs = [], []
        for text in batch["item"]:
            record, png = run_item(self.pipe, BatchItem(**json.loads(text)), self.limits)
            records.append(json.dumps(record))
            pngs.append(png or b"")
        return {"record": records, "png": pngs}


def ray_executor(
    folder: Path,
    limits: Limits,
    address: str | None,
    workers: int,
    cpus_per_worker: float,
    gpus_per_worker: float = 0.0,
    provider: str = "auto",
) -> Callable[[list[BatchItem]], Iterator[tuple[dict[str, Any], bytes | None]]]:
    """Run items on `workers` Ray actors (a local Ray on 127.0.0.1 when `address` is None)."""

    def execute(items: list[BatchItem]) -> Iterator[tuple[dict[str, Any], bytes | None]]:
        if not items:
            return
        connect(address)
        ray.data.DataContext.get_current().enable_progress_bars = False
        rows = [{"item": json.dumps(asdict(item))} for item in items]
        threads = max(1, int(cpus_per_worker))
        dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
            BatchWorker,
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=min(workers, len(rows))),
            fn_constructor_args=(str(folder), "cuda" if provider == "auto" and gpus_per_worker else provider,
                                 threads, asdict(limits)),
            num_cpus=cpus_per_worker,
            num_gpus=gpus_per_worker,
        )  # fmt: skip
        for row in dataset.iter_rows():
            png = bytes(row["png"])
            yield json.loads(row["record"]), png or None

    return execute
