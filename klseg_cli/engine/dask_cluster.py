"""``klseg evaluate --scheduler``: the pairs of a run evaluated on a Dask distributed cluster.

The client lists and pairs the files and settles the settings (``evaluation.plan``, as a
local run); each task is a plain function of one pair — ``evaluation.evaluate_pair``, the
function a local run calls — or of one block of image rows of a huge map, and returns its
``Stats`` (sums: a few kB however large the map). The client merges them in pair order, so a
run on a cluster gives the numbers of ``--jobs 1`` to the last digit; a map split into row
blocks merges its blocks in row order (the same sums, added in another grouping: equal to
float64 rounding). Dask does the rest: placement, retries of tasks whose worker died,
progress. The workers need klseg (and, for URLs, its ``cloud`` extra) installed and must
see the same paths — local paths are sent as absolute ones, so a shared file system or
URLs (``s3://...``) serve. Each task carries the run's read options, network bounds
(``--timeout``, ``KLSEG_*``: see io/network.py) and ``--strict-zarr`` included, and applies
them before it reads, so a worker whose environment differs still waits and retries as the
client said; the Zarr chunks a task found missing come back with its sums.

distributed is the optional extra ``klseg[dask]``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, UsageError

EXTRA_HINT = "pip install 'klseg[dask]'"
BLOCK_VALUES = 1 << 25
"""A task of a split map reads at most about this many values (128 MB of float32)."""
SPLIT_VALUES = 1 << 27
"""Maps with more values than this (512 MB of float32) are split into row blocks."""
CONNECT_TIMEOUT = 30  # seconds to reach a scheduler before a usage error


@dataclass(frozen=True)
class Block:
    """Image rows [r0, r1) of one pair's map: one task of a split map."""

    r0: int
    r1: int


def _distributed():
    try:
        import distributed
    except ImportError:
        raise UsageError(
            f"--scheduler needs the optional extra: {EXTRA_HINT} (dask[distributed])"
        ) from None
    return distributed


def connect(scheduler: str):
    """(client, close): a Client of ``tcp://HOST:PORT``, or of an in-process LocalCluster of
    N worker processes for ``local:N``."""
    distributed = _distributed()
    spec = scheduler.strip()
    if spec.startswith("local"):
        _, _, n = spec.partition(":")
        try:
            workers = int(n) if n else (os.cpu_count() or 1)
        except ValueError:
            raise UsageError(
                f"--scheduler local:N needs a number of workers, got {spec!r}"
            ) from None
        if workers < 1:
            raise UsageError(f"--scheduler local:N needs at least one worker, got {workers}")
        cluster = distributed.LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True,
            dashboard_address=None, host="127.0.0.1",
        )  # fmt: skip
        client = distributed.Client(cluster)

        def close() -> None:
            client.close()
            cluster.close()

        return client, close
    try:
        client = distributed.Client(spec, timeout=CONNECT_TIMEOUT)
    except (OSError, TimeoutError, ValueError) as err:
        raise UsageError(f"--scheduler {spec}: cannot reach the Dask scheduler ({err})") from None
    return client, client.close


# --- what runs on a worker ------------------------------------------------------------------

_DIE_ONCE = "_KLSEG_TEST_DIE_ONCE"
"""Tests only: a worker whose environment names a file that exists (and no ``.done`` beside
it) exits abruptly in its first task, to show Dask retrying the task elsewhere."""


def _maybe_die() -> None:
    marker = os.environ.get(_DIE_ONCE)
    if marker and os.path.exists(marker) and not os.path.exists(marker + ".done"):
        Path(marker + ".done").write_text("died once\n")
        os._exit(1)


def run_task(pair, block: Block | None, settings, read):
    """One task: an ``ImageResult`` (a pair) or ``(Stats, height, width, missing Zarr
    chunks)`` (a block), or
    ``("error", kind, message, path)`` for an InputError — rebuilt by the client, so the
    error is the one line it is locally."""
    _maybe_die()
    from ..io.opening import use_read_options
    from .image import evaluate_pair

    use_read_options(read)
    try:
        if block is None:
            return evaluate_pair(pair, settings, read=read)
        from ..io.zarrio import collect_missing, frozen

        with collect_missing() as missing:
            stats, height, width = _block_stats(pair, block, settings, read)
        return stats, height, width, frozen(missing) or None
    except InputError as err:
        return ("error", type(err).__name__, err.message, err.path)


def _block_stats(pair, block: Block, settings, read):
    """The sums of rows [r0, r1) of a pair: the map's rows read through its own source (the
    same chunked reads as a whole map), the target's rows alone where it is Zarr."""
    from ..io.opening import open_pair
    from ..io.readers import PredictionMap

    if pair.target is not None and pair.target.suffix.lower() == ".zarr":
        opened = _open_zarr_block(pair, block, settings, read)
        target = opened.target
    else:
        opened = open_pair(pair, soft_gt=False, num_classes=settings.num_classes, read=read)
        target = opened.target[block.r0 : block.r1]
    pm, W = opened.pred, opened.width
    n = block.r1 - block.r0
    if hasattr(pm.array, "rows"):  # Zarr: one read of the block, each chunk decoded once
        rows = np.ascontiguousarray(pm.array.rows(pm.layout, block.r0, block.r1))
        part = PredictionMap(path=pm.path, array=rows, layout=pm.layout)
        return _stats_of(part, target, pair, settings, read, opened)
    stored = pm._read_rows(block.r0 * W, block.r1 * W)
    if pm.layout == "chw":
        rows = np.ascontiguousarray(np.asarray(stored).reshape(pm.num_classes, n, W))
    elif pm.layout == "hwc":
        rows = np.ascontiguousarray(np.asarray(stored).reshape(n, W, pm.num_classes))
    else:
        rows = np.ascontiguousarray(np.asarray(stored).reshape(n, W))
    part = PredictionMap(path=pm.path, array=rows, layout=pm.layout)
    return _stats_of(part, target, pair, settings, read, opened)


def _stats_of(part, target, pair, settings, read, opened):
    from .image import image_stats

    stats = image_stats(
        part, target, settings, chunk_pixels=read.chunk_pixels, target_path=pair.target,
        accelerate=read.accelerate,
    )  # fmt: skip
    return stats, opened.height, opened.width


def _open_zarr_block(pair, block: Block, settings, read):
    """The map of a pair whose target is a Zarr label mask, and only the block's label rows
    (a task never reads a huge label mask whole)."""
    from ..errors import ShapeError
    from ..io.pairing import OpenedPair
    from ..io.readers import open_prediction
    from ..io.zarrio import label_rows, open_zarr

    hw = tuple(open_zarr(pair.target, max_pixels=read.max_pixels).shape)
    if len(hw) != 2:
        raise ShapeError(f"a label mask must be 2-D (H, W), got shape {hw}", path=pair.target)
    pm = open_prediction(pair.pred, hw=hw, layout=read.layout, num_classes=settings.num_classes,
                         npz_key=read.npz_key, max_pixels=read.max_pixels)  # fmt: skip
    if pm.num_classes != settings.num_classes:
        raise ShapeError(f"has {pm.num_classes} classes, expected {settings.num_classes}",
                         path=pair.pred)  # fmt: skip
    target = label_rows(pair.target, block.r0, block.r1)
    return OpenedPair(pm, target, pm.height, pm.width)


# --- the client -----------------------------------------------------------------------------


def _absolute(path):
    if path is None or getattr(path, "is_remote", False):
        return path
    return Path(os.path.abspath(path))


def plan_blocks(job, block_rows: int | None) -> list[tuple[Any, Block | None]]:
    """The tasks: one per pair, or one per block of rows for a map of more than
    SPLIT_VALUES values (``block_rows``: rows per block; 0 never splits).

    Automatic splitting reads the first map's header only, unless that map is split: a
    folder holds maps of one kind, and a million remote headers read here, one after the
    other, would take longer than the run (as ``evaluation.parallel_backend`` decides)."""
    from ..io.pairing import Pair

    splittable = block_rows != 0 and not job.settings.soft_gt
    splittable = splittable and not job.settings.calibration_views
    splittable = splittable and job.settings.boundary is None  # surfaces need whole masks
    tasks: list[tuple[Any, Block | None]] = []
    for i, pair in enumerate(job.pairing.pairs):
        remote = Pair(pair.stem, _absolute(pair.pred), _absolute(pair.target))
        blocks = _blocks(remote, job, block_rows) if splittable else None
        if i == 0 and blocks is None and block_rows is None:
            splittable = False  # the first map is whole: so are the others
        if blocks is None:
            tasks.append((remote, None))
        else:
            tasks.extend((remote, b) for b in blocks)
    return tasks


def _blocks(pair, job, block_rows) -> list[Block] | None:
    from ..io.readers import open_prediction

    try:
        pm = open_prediction(pair.pred, hw=None, layout=job.read.layout,
                             num_classes=job.settings.num_classes, npz_key=job.read.npz_key,
                             max_pixels=job.read.max_pixels)  # fmt: skip
    except InputError:
        return None  # the task reports it
    values = pm.n_pixels * pm.num_classes
    if block_rows is None and values <= SPLIT_VALUES:
        return None
    H, W = pm.height, pm.width
    if block_rows is None:
        block_rows = max(1, BLOCK_VALUES // max(W * pm.num_classes, 1))
        chunks = getattr(getattr(pm.array, "array", None), "chunks", None)
        if chunks is not None:  # Zarr: whole chunk rows per block (each chunk read once)
            step = int(chunks[1] if pm.layout == "chw" else chunks[0])
            block_rows = max(step, block_rows // step * step)
    if block_rows >= H:
        return None
    return [Block(r0, min(r0 + block_rows, H)) for r0 in range(0, H, block_rows)]


def dask_evaluate(
    pred,
    target,
    *,
    scheduler: str,
    keep_going: bool = False,
    jobs: int | None = None,
    on_image: Callable[[Any], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    block_rows: int | None = None,
    **options,
):
    """``evaluation.evaluate`` on a Dask cluster (``jobs`` is the cluster's business and is
    ignored). ``block_rows``: rows per task of a split map (None: maps of more than
    SPLIT_VALUES values are split; 0: never)."""
    from ..core.results import EvaluationResult, ImageResult, merge_missing
    from ..core.stats import Stats
    from .local import plan

    job = plan(pred, target, **options)
    client, close = connect(scheduler)
    distributed = _distributed()
    try:
        tasks = plan_blocks(job, block_rows)
        if on_start is not None:
            on_start(len(tasks))
        futures = [
            client.submit(
                run_task,
                pair,
                block,
                job.settings,
                job.read,
                pure=False,
                key=f"klseg-{i}-{os.getpid()}-{id(job)}",
            )
            for i, (pair, block) in enumerate(tasks)
        ]
        index = {f.key: i for i, f in enumerate(futures)}
        outcomes: list[Any] = [None] * len(tasks)
        try:
            for future in distributed.as_completed(futures):
                i = index[future.key]
                outcomes[i] = future.result()
                if on_image is not None:
                    on_image(tasks[i][0])
        except BaseException:
            client.cancel(futures)
            raise
    finally:
        close()
    images: list[ImageResult] = []
    errors: list[dict] = []
    partial: dict[str, Any] = {}
    for pair, (sent, block), outcome in zip(_pairs_of(job, tasks), tasks, outcomes):
        if isinstance(outcome, tuple) and outcome and outcome[0] == "error":
            err = _rebuild(outcome, pair, sent)
            if not keep_going:
                raise err
            if not any(e["file"] == (err.path or str(pair.pred)) for e in errors):
                errors.append({"file": err.path or str(pair.pred), "message": err.message})
            partial[pair.stem] = False
            continue
        if block is None:
            outcome.pred_path, outcome.target_path = pair.pred, pair.target
            outcome.zarr_missing = _renamed(outcome.zarr_missing, pair, sent)
            images.append(outcome)
            continue
        stats, height, width, missing = outcome
        held = partial.get(pair.stem)
        if held is False:
            continue  # another block of this map failed
        if held is None:
            held = partial[pair.stem] = ImageResult(
                pair.stem, pair.pred, pair.target, height, width,
                Stats.zeros(job.settings.num_classes, job.settings.ece_bins),
            )  # fmt: skip
            images.append(held)
        held.stats = held.stats + stats
        held.zarr_missing = merge_missing(held.zarr_missing, _renamed(missing, pair, sent))
    images = [i for i in images if partial.get(i.stem) is not False]
    result = EvaluationResult.of(job, images, errors)
    result.warn_missing_chunks()
    return result


def _pairs_of(job, tasks):
    """The original pair (paths as the user gave them) of every task, in task order."""
    by_abs = {(_absolute(p.pred), _absolute(p.target)): p for p in job.pairing.pairs}
    return [by_abs[(sent.pred, sent.target)] for sent, _ in tasks]


def _renamed(missing: dict | None, pair, sent) -> dict | None:
    """A task's missing Zarr chunks keyed by the paths as the user gave them."""
    if not missing:
        return missing
    names = {str(sent.pred): str(pair.pred)}
    if sent.target is not None:
        names[str(sent.target)] = str(pair.target)
    return {names.get(store, store): value for store, value in missing.items()}


def _rebuild(outcome, pair, sent) -> InputError:
    """The InputError a worker reported, naming the paths as the user gave them."""
    from .. import errors

    _, kind, message, path = outcome
    cls = getattr(errors, kind, InputError)
    if path == str(sent.pred):
        path = str(pair.pred)
    elif sent.target is not None and path == str(sent.target):
        path = str(pair.target)
    return cls(message, path=path)
