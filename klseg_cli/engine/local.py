"""read → chunk → per-pixel terms → sums → merge → results, for one image and for a folder."""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..core.boundary import BoundaryOptions
from ..core.chunks import DEFAULT_CHUNK_PIXELS
from ..core.labels import LabelMap, default_ignore_index, load_label_map
from ..core.metrics import DEFAULT_EPS, MetricSettings
from ..core.results import EvaluationResult, ImageResult, ReadOptions
from ..errors import InputError, KlsegWarning, UsageError
from ..io.opening import open_pair, use_read_options
from ..io.pairing import Pair, Pairing, pair_files
from ..io.readers import (
    DEFAULT_MAX_PIXELS,
    PredictionMap,
    open_prediction,
    sum_tolerance,
)
from ..io.safeio import exists, read_small_text
from .image import FAST_MIN_VALUES, evaluate_pair, uses_kernel


def parse_classes(spec: str | None) -> tuple[str, ...]:
    """``--classes road,car,...`` or a file: one name a line, ``ID NAME`` lines (ids 0..C−1,
    each once, any order), or JSON (a list of names, or an object {id: name})."""
    if not spec:
        return ()
    path = Path(spec)
    is_file = exists(path) and not path.is_dir()
    if is_file:  # a FIFO, device, unreadable file: one error
        names = _class_names_file(path, read_small_text(path, what="class-names file"))
    else:
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]+://", spec):
            raise UsageError(f"--classes {spec}: give names or a local file; URLs are not read")
        if spec.endswith((".txt", ".csv", ".json", ".names")) or "/" in spec:
            raise InputError("no such class-names file", path=spec)
        names = tuple(name.strip() for name in spec.split(","))
    where = f"{path}: " if is_file else ""
    if any(not n for n in names):
        raise UsageError(f"{where}--classes has an empty name: {spec!r}")
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise UsageError(f"{where}--classes names a class twice: {', '.join(twice)}")
    return names


_ID_NAME = re.compile(r"^\s*(\d+)\s*[\s,:;=]\s*(\S.*?)\s*$")


def _class_names_file(path: Path, text: str) -> tuple[str, ...]:
    data, is_json = None, path.suffix.lower() == ".json"
    if is_json or text.lstrip()[:1] in ("[", "{"):  # "[bold]road" lines are names, not JSON
        try:
            data = json.loads(text)
            is_json = True
        except json.JSONDecodeError as err:
            if is_json:
                raise InputError(f"class names: not valid JSON ({err.msg})", path=path) from None
    if is_json:
        if isinstance(data, list) and all(isinstance(n, str) for n in data):
            names = tuple(n.strip() for n in data)
        elif isinstance(data, dict):
            try:
                by_id = {int(k): str(v).strip() for k, v in data.items()}
            except ValueError:
                raise InputError(
                    "class names: a JSON object must map class ids to names", path=path
                ) from None
            names = _names_by_id(by_id, path)
        else:
            raise InputError(
                "class names: JSON must be a list of names or an object {id: name}", path=path
            )
    else:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        matches = [_ID_NAME.match(line) for line in lines]
        if lines and all(matches):  # "0 background", "1: road", "2,car"
            names = _names_by_id({int(m.group(1)): m.group(2) for m in matches}, path)
            if len(matches) != len(names):
                raise InputError("class names: an id is listed twice", path=path)
        else:
            names = tuple(lines)
    if not names:
        raise InputError("holds no class names", path=path)
    return names


def _names_by_id(by_id: dict[int, str], path: Path) -> tuple[str, ...]:
    if sorted(by_id) != list(range(len(by_id))):
        raise InputError(
            f"class names: ids must be 0..{len(by_id) - 1}, each once; got "
            f"{', '.join(map(str, sorted(by_id)[:10]))}",
            path=path,
        )
    return tuple(by_id[i] for i in range(len(by_id)))


@dataclass(frozen=True)
class Job:
    """What to read and how to compute: the pairs, the numeric settings, the read options."""

    pairing: Pairing
    settings: MetricSettings
    read: ReadOptions


def plan(
    pred: str | Path,
    target: str | Path | None,
    *,
    classes: Sequence[str] | str | None = None,
    eps: float = DEFAULT_EPS,
    smoothing: float = 0.0,
    ignore_index: Sequence[int] | None = None,
    input_kind: str = "probs",
    log_base: float = math.e,
    soft_gt: bool = False,
    renormalize: bool = False,
    layout: str | None = None,
    pred_suffix: str = "",
    gt_suffix: str = "",
    allow_missing: bool = False,
    npz_key: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    chunk_pixels: int = DEFAULT_CHUNK_PIXELS,
    label_map: str | Path | LabelMap | None = None,
    reduce_zero_label: bool = False,
    exclude_class: Sequence[str | int] = (),
    temperature: float = 1.0,
    calibration_views: bool = False,
    boundary_band: int = 3,
    boundary: BoundaryOptions | None = None,
    spatial_dims: int = 2,
    allow_affine_mismatch: bool = False,
    timeout: float | None = None,
    strict_zarr: bool = False,
    uncertainty: Sequence[str] = (),
    qc_threshold: float = 0.5,
) -> Job:
    """Pair the files and settle the settings (the class count comes from the first map).

    ``timeout``: seconds a remote read may go without a byte (``--timeout``; None: the
    environment's ``KLSEG_TIMEOUT``, else 60; see ``io/network.py``). ``strict_zarr``: a
    missing Zarr chunk is an error instead of the fill value."""
    from ..io import network

    check_path_argument(pred, "PRED")
    check_path_argument(target, "GT")
    net = network.settings_for(timeout)
    use_read_options(ReadOptions(network=net, strict_zarr=strict_zarr))  # before any listing
    names, label_map = class_names_and_map(classes, label_map)
    from ..io.remote import as_input

    pairing = pair_files(
        as_input(pred),
        as_input(target),
        pred_suffix=pred_suffix,
        gt_suffix=gt_suffix,
    )
    if pairing.missing_pred and not allow_missing:
        shown = ", ".join(p.name for p in pairing.missing_pred[:5])
        n_missing = len(pairing.missing_pred)
        more = f" and {n_missing - 5} more" if n_missing > 5 else ""
        raise InputError(
            f"{n_missing} targets have no prediction ({shown}{more}); "
            "pass --allow-missing to evaluate the rest",
            path=pred,
        )
    if boundary is not None and soft_gt:
        raise UsageError("--boundary needs label targets (class masks), not --soft-gt maps")
    read = ReadOptions(
        layout=layout, npz_key=npz_key, max_pixels=max_pixels, chunk_pixels=chunk_pixels,
        spatial_dims=spatial_dims, allow_affine_mismatch=allow_affine_mismatch,
        network=net, strict_zarr=strict_zarr,
    )  # fmt: skip
    if calibration_views and pairing.pairs:
        from ..io.volumes import is_volume_pair

        if spatial_dims == 3 or is_volume_pair(pairing.pairs[0], read):
            raise UsageError(
                "--calibration-views works on 2-D images only: its boundary band (pixels near "
                "another class) is not computed in 3-D; leave out the view names"
            )
    num_classes = len(names) if names else None
    if num_classes is None:  # the first prediction that opens tells (--keep-going skips bad ones)
        first_error = None
        for pair in pairing.pairs:
            try:
                opened = open_pair(pair, soft_gt=soft_gt, num_classes=None, read=read)
                num_classes = opened.pred.num_classes
                break
            except InputError as err:
                first_error = first_error or err
        else:
            raise first_error
    settings = metric_settings(
        num_classes, names, label_map, eps=eps, smoothing=smoothing, ignore_index=ignore_index,
        input_kind=input_kind, log_base=log_base, soft_gt=soft_gt, renormalize=renormalize,
        reduce_zero_label=reduce_zero_label, exclude_class=exclude_class,
        temperature=temperature, calibration_views=calibration_views,
        boundary_band=boundary_band, boundary=boundary, option="--exclude-class",
        **({"uncertainty": tuple(uncertainty), "qc_threshold": qc_threshold}
           if uncertainty else {}),
    )  # fmt: skip
    job = Job(pairing, settings, read)
    if input_kind == "logits":
        _warn_if_probabilities(job)
    return job


def check_path_argument(value, what: str) -> None:
    """A usage error, not a bare TypeError, when a function reading files gets an array."""
    import os

    if value is None or isinstance(value, (str, os.PathLike)) or hasattr(value, "is_remote"):
        return
    raise UsageError(
        f"{what} must be a path or URL, got {type(value).__module__}.{type(value).__qualname__};"
        " for arrays use klseg_cli.Evaluator(num_classes).update(pred, target)"
    )


def _warn_if_probabilities(job: Job) -> None:
    """``--input logits`` on a map whose first pixels are valid probabilities: a warning
    (a softmax of probabilities is a much flatter distribution: every number changes)."""
    pair = job.pairing.pairs[0]
    try:
        pred = open_pair(pair, soft_gt=job.settings.soft_gt, num_classes=None, read=job.read).pred
        P = pred.block(0, min(pred.n_pixels, 4096))
    except InputError:
        return  # reported when the pair is evaluated
    sums = P.sum(axis=0, dtype=np.float64)
    tol = sum_tolerance(pred.array.dtype)
    if P.size and P.min() >= 0 and P.max() <= 1 and np.all(np.abs(sums - 1) <= tol):
        warnings.warn(
            f"{pair.pred}: --input logits, but the map holds probabilities (every pixel "
            "checked sums to 1); drop --input logits unless these really are logits",
            KlsegWarning,
            stacklevel=3,
        )


def class_names_and_map(
    classes: Sequence[str] | str | None, label_map: str | Path | LabelMap | None
) -> tuple[tuple[str, ...], LabelMap | None]:
    """(class names, label map) from the options: names from ``--classes`` (a spec or a
    file), else a built-in label map's own names."""
    if isinstance(classes, str) or classes is None:
        names = parse_classes(classes)
    else:
        names = tuple(classes)
    if label_map is not None and not isinstance(label_map, LabelMap):
        label_map = load_label_map(label_map)
    if not names and label_map is not None:
        names = label_map.class_names  # a built-in map knows its classes
    return names, label_map


def metric_settings(
    num_classes: int,
    names: Sequence[str],
    label_map: LabelMap | None,
    *,
    ignore_index: int | Sequence[int] | None = None,
    exclude_class: Sequence[str | int] = (),
    option: str = "exclude_class",
    **fields,
) -> MetricSettings:
    """The MetricSettings of the options shared by ``plan`` and ``api.Evaluator``: ignore
    values as a sorted set (None: ``labels.default_ignore_index``, 255 unless it is a
    class), excluded classes resolved from names or ids; ``fields`` are MetricSettings
    fields as they are (eps, smoothing, input_kind, ...)."""
    if ignore_index is None:
        ignore_index = default_ignore_index(
            int(num_classes), reduce_zero_label=fields.get("reduce_zero_label", False)
        )
    if isinstance(ignore_index, (int, np.integer)):
        ignore_index = (int(ignore_index),)
    return MetricSettings(
        num_classes=int(num_classes),
        class_names=tuple(names),
        label_map=label_map,
        ignore_index=tuple(sorted({int(i) for i in ignore_index})),
        exclude_classes=resolve_classes(exclude_class, names, int(num_classes), option),
        **fields,
    )


def resolve_classes(
    specs: Sequence[str | int], names: Sequence[str], num_classes: int, option: str
) -> tuple[int, ...]:
    """Class ids from names or ids (a name wins over an id that looks like it)."""
    ids = []
    for spec in specs:
        text = str(spec).strip()
        if text in names:
            ids.append(list(names).index(text))
        elif text.lstrip("-").isdigit() and 0 <= int(text) < num_classes:
            ids.append(int(text))
        else:
            known = ", ".join(names) if names else f"ids 0..{num_classes - 1}"
            raise UsageError(f"{option} {text!r} is not a class (classes: {known})")
    return tuple(sorted(set(ids)))


def _evaluate_one(pair: Pair, settings: MetricSettings, read: ReadOptions):
    """One pair in a worker process: its result, or the InputError it raised."""
    try:
        return evaluate_pair(pair, settings, read=read)
    except InputError as err:
        return err


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a container's share)."""
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return max(1, os.cpu_count() or 1)


def idle_core() -> bool:
    """Whether a core beyond the one computing is idle, so that a read-ahead thread runs
    beside the kernel: two or more cores here, and a load average (1 min) under one less.

    Measured on the 2-core development machine: with other work on it (load 4-7) the
    read-ahead thread waited for a core and a map took longer (median 0.97 s against
    0.73 s for 4 Cityscapes maps); the overlap pays only where a core is free."""
    import os

    cores = available_cores()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover - Windows
        load = 0.0
    return cores > 1 and load < cores - 1


def resolve_jobs(job: Job, jobs: int | None) -> tuple[int, str]:
    """(workers, backend) for ``--jobs`` (None: automatic).

    Automatic: one worker per available core, at most one per image. Threads (the kernel)
    cost nothing to start; worker processes (the NumPy path) cost about half a second
    each, so small maps, done in less, run in this process.
    """
    pairs = job.pairing.pairs
    if jobs is not None and jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {jobs}")
    if len(pairs) < 2 or jobs == 1:
        return 1, "serial"
    backend = parallel_backend(job)
    if jobs is None:
        if backend == "processes" and not _large_maps(job):
            return 1, "serial"
        jobs = available_cores()
    workers = min(jobs, len(pairs))
    return (workers, backend) if workers > 1 else (1, "serial")


def _first_map(job: Job) -> PredictionMap | None:
    """The first prediction, opened (its header only), or None when it cannot be: folders
    hold maps of one kind, so it stands for them; its error is reported with its pair."""
    try:
        return _first_prediction(job)
    except InputError:
        return None


def _large_maps(job: Job) -> bool:
    """Whether the first map is large enough (as the kernel's threshold) to be worth a
    worker process."""
    pred = _first_map(job)
    return pred is not None and pred.n_pixels * pred.num_classes >= FAST_MIN_VALUES


def _first_prediction(job: Job) -> PredictionMap:
    """The first pair's prediction, opened from its header (a volume: its size only)."""
    from ..io.volumes import is_volume_pair

    pair = job.pairing.pairs[0]
    if is_volume_pair(pair, job.read):
        from ..io.volumes import header_map

        return header_map(pair.pred, job.read, job.settings.num_classes)
    return open_prediction(
        pair.pred, hw=None, layout=job.read.layout, num_classes=job.settings.num_classes,
        npz_key=job.read.npz_key, max_pixels=job.read.max_pixels,
    )  # fmt: skip


def parallel_backend(job: Job) -> str:
    """How ``--jobs`` runs images in parallel: ``"threads"`` or ``"processes"``.

    Measured on a 2-core machine with Cityscapes-sized maps. When the compiled kernel
    evaluates the maps, each chunk is one call that releases the GIL (``nogil``), so
    threads over images run on both cores at once, share the loaded kernel and pay no
    start-up: threads. The NumPy path is many short NumPy calls per chunk that queue on the
    GIL (2 threads ran at 0.84-1.0x the speed of one), so it uses processes: each imports
    klseg, keeps its own bounded chunk buffers and returns a Stats of a few arrays, cheap to
    pickle. The first prediction decides (``_first_map``).
    """
    pred = _first_map(job)
    if pred is None:
        return "processes"
    return "threads" if uses_kernel(pred, job.settings, job.read.accelerate) else "processes"


def _results(job: Job, jobs: int | None):
    """(pair, ImageResult or InputError) for every pair, in pair order, for any ``jobs``.

    Parallelism is over images (see ``resolve_jobs``: threads or processes). Results are
    merged in pair order, so any ``jobs`` gives the same numbers.
    """
    pairs = job.pairing.pairs
    workers, backend = resolve_jobs(job, jobs)
    if backend == "serial":
        # one worker: an idle second core (if any) reads the next chunk during the kernel
        read = replace(job.read, read_ahead=idle_core())
        for pair in pairs:
            yield pair, _evaluate_one(pair, job.settings, read)
        return
    if backend == "threads":
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="klseg")
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("spawn")  # no fork of a threaded parent
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
    yield from pooled_results(pool, _evaluate_one, pairs, job.settings, job.read)


def pooled_results(pool, fn, pairs, *args):
    """(pair, fn(pair, *args)) from an executor, in pair order; on an error or Ctrl-C the
    work not yet started is cancelled and the pool shut down."""
    with pool:
        futures = [pool.submit(fn, pair, *args) for pair in pairs]
        try:
            for pair, future in zip(pairs, futures):
                yield pair, future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def evaluate(
    pred: str | Path,
    target: str | Path,
    *,
    keep_going: bool = False,
    jobs: int | None = None,
    on_image: Callable[[Pair], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    **options,
) -> EvaluationResult:
    """Evaluate prediction maps against targets: two files or two folders.

    ``options`` are those of ``plan`` (classes, eps, smoothing, ignore_index, input_kind,
    log_base, soft_gt, layout, suffixes, allow_missing, npz_key, max_pixels, chunk_pixels).
    With ``keep_going``, a pair that cannot be read is recorded in ``errors`` and skipped.
    ``jobs``: images evaluated at once (threads with the kernel, else processes); None, the
    default, uses every available core where that pays (``resolve_jobs``). The results are
    identical for any value.

    Example (in a notebook)::

        import klseg_cli
        result = klseg_cli.evaluate("preds/", "labels/", classes="classes.txt")
        result.summary()["dataset"]["miou_pooled"]
    """
    if jobs is not None and jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {jobs}")
    job = plan(pred, target, **options)
    if on_start is not None:
        on_start(len(job.pairing.pairs))
    images: list[ImageResult] = []
    errors: list[dict] = []
    for pair, outcome in _results(job, jobs):
        if isinstance(outcome, InputError):
            if not keep_going:
                raise outcome
            errors.append({"file": outcome.path or str(pair.pred), "message": outcome.message})
        else:
            images.append(outcome)
        if on_image is not None:
            on_image(pair)
    result = EvaluationResult.of(job, images, errors)
    result.warn_missing_chunks()
    return result
