"""Shards in, shards out: ``eclipse-stream purify``. This module only orchestrates.

    plan (outdir) -> read workers (reading) -> device loop (here) -> encode threads (here)
      -> in-order assembly (assembly) -> finisher thread (finisher) -> manifest (outdir)

1. **Plan** (rank 0, OUT locked): refuse an OUT that overlaps the input, lock OUT (before ``--deblur auto``'s
   fit), remove what killed runs left, skip shards already done with the same settings (``outdir``).
2. **Read** (DataLoader worker processes, ``reading``): one worker reads one whole shard through its format
   (``formats``), decodes every image field, applies the resolution policy and buckets images into batches;
   it sends typed events (``events``).
3. **Device loop** (main process, :class:`DeviceLoop`): each batch goes through the purifier with a generator
   seeded from ``(seed, shard file name, batch number)``, or, for a size the purifier tiles (its ``tiles(h, w)``
   says so), one generator per image seeded from ``(seed, shard file name, sample position, field)``; the
   result is copied to the host without waiting.
4. **Encode** (:class:`Encoder`, a thread pool): purified pixels are cropped back to each image's size and
   encoded by the shard's format, then handed to the shard's :class:`~eclipse_stream.assembly.OutputShard`,
   which writes samples in input order to a temporary file.
5. **Finish** (:class:`~eclipse_stream.finisher.Finisher`, a thread): close, fsync, rename, stats file.
   ``manifest.json`` is written last, by rank 0, when every shard of every rank is done.

The purifier is any callable of (uint8 N x 3 x H x W batch, torch.Generator) -> uint8 batch of the same
shape; by default the ECLIPSE :class:`~eclipse_stream.purifier.Purifier` of the given denoiser. One with a
``tiles(height, width)`` method is handed a list of per-image generators for the sizes where it returns True.

Memory is bounded by the DataLoader prefetch (a few events per worker), the encode queue
(``2 x encode_threads`` batches) and, per open shard, the samples waiting for an earlier sample's batch
(at most ``4 x batch_size`` images before buckets are flushed early).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .assembly import OutputShard
from .checkpoint import Denoiser, check_tensors, load_denoiser
from .config import PurifyConfig, default_workers  # noqa: F401  (PurifyConfig is part of this module's API)
from .distributed import ProcessGroup, RankZeroError
from .errors import EclipseError, NumericalError, SampleError, ShardError
from .events import Batch, Members, Rejected, ShardEnded, ShardFailed, ShardStarted
from .finisher import Finisher
from .formats import WritePolicy, format_for
from .outdir import (  # noqa: F401
    MANIFEST,
    Task,
    check_no_overlap,
    claim_out,
    earlier_settings,
    partial_path,
    plan,
    prepare_out,
    stats_path,
    write_manifest,
)
from .outstore import OutputStore, open_store
from .purifier import Purifier
from .reading import ReadSettings, ShardEvents, as_is, reader_worker_init
from .seeding import batch_generator, image_generator, stream_seed  # noqa: F401  (part of this module's API)
from .sources import expand_shards
from .storage import redact

log = logging.getLogger(__name__)

__all__ = ["PurifyConfig", "RunResult", "batch_generator", "purify_shards", "stream_seed"]

#: (uint8 N x 3 x H x W batch on the device, generator) -> uint8 batch of the same shape
PurifierFn = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@dataclass
class RunResult:
    processed: list[dict]
    skipped: list[str]
    failed: list[dict]
    manifest: str | None


@dataclass
class RunContext:
    """What every stage of one run shares: settings, where outputs go, what they are recorded with."""

    cfg: PurifyConfig
    store: OutputStore  # OUT: a local folder or an fsspec destination
    fingerprint: dict
    device: torch.device
    read: ReadSettings
    rank: int = 0
    progress: bool = True
    deblur: Callable | None = None  # deblur.ClasswiseDeblur: (batch on the device, labels) -> batch, before purifying;
                                    # its .refill(batch, labels) after

    def write_policy(self, task: Task) -> WritePolicy:
        return WritePolicy(self.cfg.jpeg_quality, stream_seed(self.cfg.seed, task.name, "beton") % 2**32)


# ---------------------------------------------------------------------------------------------------------
# Encode threads and the device loop
# ---------------------------------------------------------------------------------------------------------

class Encoder:
    """Crops purified batches back to each image, encodes them and hands them to their shard (a thread pool,
    at most ``2 x threads`` batches queued). A shard made complete here goes to the finisher."""

    def __init__(self, ctx: RunContext, finisher: Finisher):
        self.on_error, self.finisher = ctx.cfg.on_error, finisher
        self.errors: list[BaseException] = []
        self._slots = threading.BoundedSemaphore(2 * ctx.cfg.encode_threads)
        self._pool = ThreadPoolExecutor(ctx.cfg.encode_threads, thread_name_prefix="eclipse-encode")

    def submit(self, shard: OutputShard, items: list, out: torch.Tensor, ready, inputs: torch.Tensor) -> None:
        self._slots.acquire()
        self._pool.submit(self._encode, shard, items, out, ready, inputs)

    def _encode(self, shard: OutputShard, items: list, out: torch.Tensor, ready, inputs: torch.Tensor) -> None:
        try:
            if ready is not None:  # the device -> host copy was queued without blocking the device loop
                ready.synchronize()
            for item, img, before in zip(items, out, inputs):
                h, w = item.size
                rgb = img[:, :h, :w].permute(1, 2, 0).numpy()
                check_purified(rgb, before[:, :h, :w], shard.task.path, item.key)
                try:
                    value, reason = shard.encode(item, rgb), None
                except (ValueError, OSError) as e:
                    value, reason = None, f"cannot encode purified image: {e}"
                    if self.on_error == "fail":
                        where = f"field {item.image.field!r}: " if item.parts > 1 else ""
                        raise SampleError(shard.task.shown, item.key, where + reason) from None
                if shard.put_image(item, value, reason):
                    self.finisher.submit(shard)
        except BaseException as e:  # noqa: BLE001 - raised again on the main thread
            self.errors.append(e)
        finally:
            self._slots.release()

    def check(self) -> None:
        if self.errors:
            raise self.errors[0]

    def close(self, cancel: bool = False) -> None:
        self._pool.shutdown(wait=True, cancel_futures=cancel)
        if not cancel:
            self.check()


#: An input image whose values span more than this many levels is never purified to one constant colour by
#: a working purifier; a constant result means NaN (cast to 0) or inf (to 255) came out of the device.
CONSTANT_CHECK_MIN_RANGE = 32


def check_purified(out: np.ndarray, before: torch.Tensor, shard: str, key: str) -> None:
    """Refuse a purified image that is one constant value although its input was not flat: a broken denoiser
    (NaN/inf weights passed in memory) or a numerical overflow (fp16) gives NaN, which the cast to uint8 turns
    into 0 (inf into 255); the UNet's group norms spread any NaN to the whole image. This runs on the encode
    thread on the host copy the encoder reads anyway (one min and max per image; the input only when the output
    is constant), so the device loop never waits for it. The run stops (NumericalError) before the shard, or
    any later one, is written."""
    lo, hi = out.min(), out.max()
    if lo != hi:
        return
    spread = int(before.max()) - int(before.min())
    if spread > CONSTANT_CHECK_MIN_RANGE:
        raise NumericalError(f"{shard}: sample {key!r}: the purifier returned one constant value ({int(lo)}) for "
                             f"an image whose values span {spread} levels: NaN or inf came out of the denoiser "
                             "(broken weights, or an overflow: try --precision fp32); nothing of this shard is "
                             "written")


class DeviceLoop:
    """The main process: reader events in, in order; batches to the device; everything else to its shard."""

    def __init__(self, ctx: RunContext, purifier: PurifierFn, tasks: list[Task], bar):
        self.ctx, self.purifier, self.bar = ctx, purifier, bar
        self.tasks = {t.index: t for t in tasks}
        self.shards: dict[int, OutputShard] = {}
        self.failed: list[dict] = []
        self.processed: list[dict] = []
        self._processed_lock = threading.Lock()
        self.encoder: Encoder | None = None
        self.finisher: Finisher | None = None
        self._handlers = {ShardStarted: self.on_start, Batch: self.on_batch, Members: self.on_members,
                          Rejected: self.on_reject, ShardFailed: self.on_failed, ShardEnded: self.on_end}

    def run(self, events) -> None:
        """Consume every event; then wait for encoding and finishing. On any error, abort what is unfinished."""
        try:
            for ev in events:
                if self.finisher is None:  # threads start after the reader workers are forked
                    self.finisher = Finisher(self.ctx.fingerprint, self.ctx.rank, self.on_done, self.ctx.store)
                    self.encoder = Encoder(self.ctx, self.finisher)
                self.encoder.check()
                self.finisher.check()
                self._handlers[type(ev)](ev)
            if self.finisher is not None:
                self.encoder.close()
                self.finisher.close()
        except BaseException:
            if self.encoder is not None:
                self.encoder.close(cancel=True)
                self.finisher.cancel()
            for shard in self.shards.values():
                shard.abort()
            self.ctx.store.remove_own_partials()  # also one a signal left before its shard was registered
            raise
        for shard in self.shards.values():
            if shard.state not in ("done", "aborted"):
                raise EclipseError(f"{shard.task.shown}: shard did not complete "
                                   f"({shard.next_index} of {shard.expected} samples)")

    def _complete(self, shard: OutputShard, complete: bool) -> None:
        if complete:
            self.finisher.submit(shard)

    def on_start(self, ev: ShardStarted) -> None:
        task = self.tasks[ev.shard]
        store = self.ctx.store
        self.shards[ev.shard] = OutputShard.create(task, store.staging, store.partial_path(task.name),
                                                   self.ctx.write_policy(task), ev.input_stat)

    def on_batch(self, ev: Batch) -> None:
        device, seed, name = self.ctx.device, self.ctx.cfg.seed, self.tasks[ev.shard].name
        x = ev.tensor()
        tiles = getattr(self.purifier, "tiles", None)
        if tiles is not None and tiles(*x.shape[-2:]):  # each image on its own: its own noise
            gen = [image_generator(seed, name, item.index, item.image.field, device) for item in ev.items]
        else:
            gen = batch_generator(seed, name, ev.batch_no, device)
        xd = x.to(device, non_blocking=True)
        if self.ctx.deblur is not None:
            xd = self.ctx.deblur(xd, [item.label for item in ev.items])
        out = self.purifier(xd, gen)
        if self.ctx.deblur is not None:  # the border ring of every labelled image, where a class is deblurred
            out = self.ctx.deblur.refill(out, [item.label for item in ev.items])
        out, ready = _to_host(out)
        self.bar.update(sum(item.fields is not None for item in ev.items))  # samples, not image fields
        self.encoder.submit(self.shards[ev.shard], ev.items, out, ready, x)

    def on_members(self, ev: Members) -> None:
        self._complete(self.shards[ev.shard], self.shards[ev.shard].put_members(ev.index, ev.members))

    def on_reject(self, ev: Rejected) -> None:
        task = self.tasks[ev.shard]
        if self.ctx.cfg.on_error == "fail":
            raise SampleError(task.shown, ev.key, ev.reason)
        log.warning("%s: skipping sample %r: %s", task.shown, ev.key, ev.reason)
        self.bar.update(1)  # a rejected sample is done too: the bar reaches the shard's sample count
        shard = self.shards[ev.shard]
        self._complete(shard, shard.reject(ev.index, ev.sample_no, ev.key, ev.reason))

    def on_failed(self, ev: ShardFailed) -> None:
        task = self.tasks[ev.shard]
        if self.ctx.cfg.on_error == "fail":
            raise ShardError(task.shown, ev.reason)
        log.error("%s: shard failed: %s", task.shown, ev.reason)
        self.shards[ev.shard].abort()
        self.failed.append({"shard": task.name, "input": task.shown, "reason": ev.reason})

    def on_end(self, ev: ShardEnded) -> None:
        self._complete(self.shards[ev.shard], self.shards[ev.shard].end(ev.count))

    def on_done(self, stats: dict) -> None:
        """A shard is finished (on the finisher thread): record it, update the progress estimate."""
        with self._processed_lock:
            self.processed.append(stats)
            done_samples = sum(s["samples_in"] for s in self.processed)
            self.bar.total = round(done_samples / len(self.processed) * len(self.tasks))
            self.bar.set_postfix(shards=f"{len(self.processed)}/{len(self.tasks)}", refresh=False)


def _to_host(out: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """Copy a result to host memory; on CUDA without waiting (pinned buffer + an event to wait on)."""
    if out.device.type != "cuda":
        return out.cpu(), None
    host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
    host.copy_(out, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record(torch.cuda.current_stream(out.device))  # the stream the copy was queued on
    return host, ready


def run_tasks(ctx: RunContext, tasks: list[Task], purifier: PurifierFn):
    """Purify ``tasks`` into ``ctx.store``: reader workers -> device loop -> encode -> finish.
    Returns (stats of each processed shard, failed shards)."""
    if not tasks:
        return [], []
    cfg = ctx.cfg
    loader = DataLoader(ShardEvents(tasks, ctx.read), batch_size=None, collate_fn=as_is, num_workers=cfg.workers,
                        worker_init_fn=functools.partial(reader_worker_init, parent=os.getpid()) if cfg.workers
                        else None, pin_memory=ctx.device.type == "cuda",
                        prefetch_factor=4 if cfg.workers else None, persistent_workers=False)
    bar = tqdm(total=None, unit="sample", desc=f"purify[{ctx.rank}]" if ctx.rank else "purify",
               disable=not ctx.progress, dynamic_ncols=True)
    loop = DeviceLoop(ctx, purifier, tasks, bar)
    events = None
    try:
        with contextlib.ExitStack() as sessions:
            for fmt in dict.fromkeys(t.format for t in tasks):  # e.g. the .beton builder, forked from here
                sessions.enter_context(fmt.session())
            events = iter(loader)
            loop.run(events)
    finally:
        bar.close()
        # Stop the reader workers now, also on an error or SIGTERM/SIGINT: left to garbage collection they can
        # outlive this process, blocked on a queue nobody reads.
        shutdown = getattr(events, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
    return loop.processed, loop.failed


# ---------------------------------------------------------------------------------------------------------
# The purifier, the process group, the run
# ---------------------------------------------------------------------------------------------------------

@dataclass
class _DeviceStage:
    fn: PurifierFn
    model_size: int | None
    tile_size: int | None  # images with a longer (padded) side are tiled by the purifier, one by one
    checkpoint_sha256: str
    denoiser_path: str | None
    custom: str | None  # a caller's purifier: what it is recorded as
    class_spectra: object = None  # deblur.ClassSpectra the denoiser recorded of its sparse clean set, if any


def _device_stage(denoiser, purifier, cfg: PurifyConfig, device: torch.device) -> _DeviceStage:
    """The ECLIPSE purifier of ``denoiser`` (the shipped one if None), or the caller's ``purifier``."""
    den = None
    if denoiser is not None or purifier is None:
        if denoiser is None:
            from .defaults import default_denoiser_path
            denoiser = default_denoiser_path()
        if isinstance(denoiser, Denoiser):  # in memory: the same checks as a file's weights get on load
            check_tensors(denoiser.model.state_dict(), denoiser.path or "the denoiser passed in")
            den = denoiser.to(device)
        else:
            den = load_denoiser(denoiser, device=device)
    custom = None
    if purifier is None:
        purifier = Purifier(den, cfg.purifier)
        if cfg.compile:
            purifier.compile_denoiser()
    else:
        if cfg.compile:
            raise ValueError("compile applies to the ECLIPSE purifier; torch.compile your own purifier yourself")
        custom = getattr(purifier, "fingerprint", None) or \
            f"{type(purifier).__module__}.{type(purifier).__qualname__}"
    model_size = den.image_size if den is not None else getattr(purifier, "image_size", None)
    if cfg.resolution == "model" and model_size is None:
        raise ValueError("resolution 'model' needs the denoiser's image size: pass the denoiser too")
    sha = (den.sha256 or _weights_sha256(den.model)) if den is not None else custom  # in memory: the weights
    tiles = getattr(purifier, "tiles", None)
    tile_size = getattr(purifier, "tile_size", None) if tiles is not None else None
    return _DeviceStage(_Call(purifier, tiles), model_size, tile_size, sha, str(den.path) if den is not None else None,
                        custom, den.class_spectra if den is not None else None)


@dataclass
class _Call:
    """The device stage as the device loop calls it; ``tiles(h, w)``: the sizes that get per-image generators."""

    purifier: Callable
    tiles: Callable[[int, int], bool] | None = None

    def __call__(self, x: torch.Tensor, generator) -> torch.Tensor:
        return self.purifier(x, generator=generator)


LABEL_PROBE = 64  # --deblur auto: samples of the first shard looked at for labels before a fitting pass


_FIT_KEYS = ("class_kernels", "class_kernels_fitted")


def _class_deblur(cfg: PurifyConfig, stage: _DeviceStage, shards: list, fingerprint: dict, store):
    """The class-wise deblurring stage of this run, or None; what it does is added to ``fingerprint``.

    ``--class-kernels FILE``: that file's kernels. ``--deblur auto`` (the default) with a denoiser that recorded
    its sparse clean set's class spectra: one sampling pass over the inputs (as ``fit-kernels``), a kernel fitted
    per class against the record, and only classes with a real blur deconvolved. No record, no labels (the first
    shard's first samples have none) or no blur found: None, and the run is byte for byte the ``--deblur off`` one.
    A resumed run (OUT, ``store``, holds shards finished with these settings) keeps the decision OUT was begun
    with, without a new fitting pass, so every shard of OUT is purified alike (``--overwrite`` decides afresh).
    """
    from .deblur import ClassKernels, ClasswiseDeblur, fit_kernels_from_shards

    if cfg.class_kernels is not None:
        kernels = ClassKernels.load(cfg.class_kernels)
        fingerprint["class_kernels"] = kernels.fingerprint()  # what it does, not where the file is
        return ClasswiseDeblur(kernels)
    if cfg.deblur != "auto" or stage.class_spectra is None or not shards:
        return None
    earlier = None if cfg.overwrite else earlier_settings(shards, store)
    if earlier is not None and _without_fit(earlier) == _without_fit(fingerprint):
        kept = _kept_deblur(earlier)
        if kept is not False:
            log.info("--deblur auto: resuming %s: %s, as in its finished shards (no fitting pass; --overwrite to "
                     "decide afresh)", store.location, "no class-wise deblurring" if kept is None else
                     f"deblurring classes {', '.join(sorted(kept.kernels))}")
            if kept is None:
                return None
            fingerprint.update({k: earlier[k] for k in _FIT_KEYS})
            return ClasswiseDeblur(kept)
    unread: list[str] = []

    def unreadable(shard: str, error: Exception) -> None:
        unread.append(redact(shard))
        log.warning("--deblur auto: %s could not be read to its end for the fit (%s); fitting on the other shards "
                    "(its own pass reports it again)", redact(shard), error)

    try:
        first = format_for(shards[0]).labelled(str(shards[0]), cfg.label_key, cfg.image_key, cfg.max_pixels)
        try:
            probed = {str(item.label) for _, item in zip(range(LABEL_PROBE), first) if item.error is None}
        finally:
            close = getattr(first, "close", None)
            if close:
                close()
        if not probed:
            log.info("--deblur auto: the first samples of %s carry no class label; no class-wise deblurring",
                     redact(shards[0]))
            return None
        if probed - set(stage.class_spectra.images):  # another dataset's record: known before any sampling pass
            return _foreign_record(sorted(probed - set(stage.class_spectra.images)))
        kernels = fit_kernels_from_shards(shards, reference=stage.class_spectra, label_key=cfg.label_key,
                                          image_key=cfg.image_key, log=log.debug, on_shard_error=unreadable)
    except (EclipseError, OSError) as e:  # e.g. too few readable images; the shards' own passes report theirs
        log.warning("--deblur auto: no class-wise deblurring in this run: the inputs could not be sampled (%s)", e)
        return None
    unknown = sorted(c for c, info in kernels.classes.items() if not info.get("clean_images"))
    if unknown:  # the record is of another dataset (e.g. the shipped CIFAR-10 one): its classes are not these
        return _foreign_record(unknown)
    if not kernels.kernels:
        log.info("--deblur auto: no class of the inputs is blurred against the denoiser's clean class spectra")
        return None
    log.warning("--deblur auto: classes %s look blurred class-wise (a convolution poison such as CUDA) against the "
                "denoiser's record of its clean set; deconvolving them before purifying (recorded in the manifest; "
                "--deblur off to disable)", ", ".join(sorted(kernels.kernels)))
    fingerprint["class_kernels"] = kernels.fingerprint()
    fingerprint["class_kernels_fitted"] = {"kernels": kernels.kernels, "classes": kernels.classes}
    if unread:  # which inputs the fit did not see to the end (a resumed run keeps these kernels)
        fingerprint["class_kernels_fitted"]["unreadable_shards"] = unread
    return ClasswiseDeblur(kernels)


def _foreign_record(unknown: list[str]) -> None:
    log.warning("--deblur auto: the denoiser's class spectra do not cover class(es) %s of the inputs (recorded for "
                "another dataset?); no class-wise deblurring (train a denoiser on this dataset's sparse set, or use "
                "fit-kernels --clean)", ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else ""))


def _without_fit(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if k not in _FIT_KEYS}


def _kept_deblur(earlier: dict):
    """What ``--deblur auto`` decided in a run whose settings were ``earlier``: None (nothing deblurred), its
    ClassKernels, or False (not an auto decision, e.g. ``--class-kernels``: fit as usual, and :func:`plan`
    refuses if the result differs)."""
    from .deblur import ClassKernels

    fitted = earlier.get("class_kernels_fitted")
    if earlier.get("class_kernels") is None and fitted is None:
        return None
    if not isinstance(fitted, dict):
        return False
    try:
        kernels = ClassKernels(kernels=dict(fitted["kernels"]), classes=dict(fitted["classes"]))
    except (KeyError, TypeError, ValueError):
        return False
    return kernels if kernels.fingerprint() == earlier.get("class_kernels") else False


def _rank_zero_step(group: ProcessGroup, step):
    """Run ``step`` on rank 0 and share its verdict: its error is raised on rank 0 and, as :class:`RankZeroError`,
    on every other rank, so no rank goes on alone. Returns the step's result (None on the other ranks)."""
    problem = error = result = None
    if group.rank == 0:
        try:
            result = step()
        except EclipseError as e:
            problem, error = (e.exit_code, str(e)), e
    problem = group.share_go(problem)
    if error is not None:
        raise error
    if problem is not None:
        raise RankZeroError(*problem)
    return result


def _weights_sha256(model: torch.nn.Module) -> str:
    """A hash of a model's tensors (names and bytes), so two in-memory denoisers never share outputs on resume."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return "weights:" + h.hexdigest()


def purify_shards(inputs, out_dir, denoiser: str | os.PathLike | Denoiser | None = None,
                  cfg: PurifyConfig | None = None, *, purifier=None, progress: bool = True) -> RunResult:
    """Purify every shard of ``inputs`` into ``out_dir``; under torchrun each rank takes shards[rank::world].

    ``inputs``: local paths, URLs WebDataset opens (``http(s)://``, ``pipe:``) or fsspec URLs (``s3://``...);
    ``out_dir``: a local folder, a ``file://`` URL or an fsspec URL (see ``storage`` and ``outstore``).

    ``denoiser`` is a checkpoint path or an already loaded :class:`Denoiser` (moved to the device); None is the
    shipped default. ``purifier``, if given, replaces the ECLIPSE purifier: any callable
    ``purifier(x, generator=g)`` of a uint8 N x 3 x H x W batch on the device returning a uint8 batch of the
    same shape. It is recorded in the settings by its ``fingerprint`` attribute, or else its class name.
    """
    cfg = cfg or PurifyConfig()
    device = cfg.resolved_device()
    if purifier is not None and getattr(purifier, "device", None) is not None:
        device = torch.device(purifier.device)
    if device.type == "cuda":
        # cuda:LOCAL_RANK must also be the current device: NCCL collectives and default streams use it
        torch.cuda.set_device(device)
    group = ProcessGroup(device)
    shards = expand_shards(inputs)
    for fmt, first in {format_for(s): s for s in shards}.items():  # e.g. a .beton without ffcv: before any work
        fmt.check_usable(str(first))
    check_no_overlap(inputs, shards, out_dir)
    stage = _device_stage(denoiser, purifier, cfg, device)
    fingerprint = cfg.fingerprint(stage.checkpoint_sha256, device.type)
    if stage.custom is not None:
        fingerprint["device_stage"] = stage.custom  # the caller's purifier, not the ECLIPSE one
    store = open_store(out_dir)
    # The lock on OUT belongs to the job: rank 0 takes it before the deblurring fit (a second run into the same OUT
    # is refused at once, not after minutes of sampling), then tidies OUT and plans; after each step it tells the
    # other ranks whether to go on.
    lock = store.lock() if group.rank == 0 else None
    try:
        _rank_zero_step(group, lambda: claim_out(store, lock))
        deblur = _class_deblur(cfg, stage, shards, fingerprint, store)
        read = ReadSettings.from_config(cfg, stage.model_size, stage.tile_size, labels=deblur is not None)
        ctx = RunContext(cfg, store, fingerprint, device, read, group.rank, progress, deblur)
        planned = _rank_zero_step(group, lambda: prepare_out(store, shards, fingerprint, cfg.overwrite))

        # rank 0 planned (and warned) above; the other ranks plan again, quietly
        todo, done = planned or plan(shards, store, fingerprint, cfg.overwrite, quiet=True)
        mine = [t for t in todo if t.index % group.world == group.rank]
        processed, failed = run_tasks(ctx, mine, stage.fn)
        if cfg.class_kernels is not None and deblur.kernels.kernels and mine and not deblur.deblurred:
            log.warning("--class-kernels %s: no image had a label of a deblurred class (%s); was it fitted on "
                        "this dataset?", cfg.class_kernels, ", ".join(sorted(deblur.kernels.kernels)))
        failed = group.all_failed(failed)
        manifest = None
        if group.rank == 0 and not failed:
            manifest = write_manifest(shards, store, stage.denoiser_path, stage.checkpoint_sha256,
                                      fingerprint, group.world)
        group.barrier()  # every rank is done with OUT: rank 0 may release the lock
    finally:
        if lock is not None:
            lock.release()
        store.close()
    group.close()
    return RunResult(processed, done, failed, manifest)
