"""The DALI loader: our index lists decide the order, DALI decodes and augments.

Each pass cuts its list of positions into batches and, for each batch, reads the encoded bytes
(a few threads, since reads from network storage wait rather than compute), checks each
header (``peek_size``: empty, not an image, JPEG cut short) and draws the augmentation from the
same per-sample generator as the torchvision loader (``transforms.sample_crop`` keyed by
(seed, epoch, position, index)). Bytes and crop windows go to DALI through external sources
in batch mode (``feed_input``), so the batches are exactly our batches: the partial last one
included, nothing padded, nothing reordered. DALI then decodes (nvJPEG on a GPU process,
libjpeg-turbo on CPU; one graph, a device choice), crops, resizes, flips and normalises.
With multi-crop (``data.crops``) the training graph decodes each image once and has one output
per view, each cut from its own fed window (anchor0, shape0, mirror0, anchor1...; the
generator keyed by the view number too, as MultiViewTransform's).

Fed ahead: the reader threads read and check the bytes of the next ``_PREFETCH`` batches in
the background while DALI decodes the ``_PREFETCH`` batches it was handed (its prefetch queue
depth) and the caller trains on the current one; handing a read batch to DALI (feed_input,
schedule_run) is a copy of its bytes, done in the caller's thread because a DALI pipeline is
driven from one thread. On a GPU, nvJPEG splits the JPEG decoding between the hardware
decoder of an A100/H100 (``hw_decoder_load`` of the images) and CUDA; CPU-decoded batches are
copied into pinned host memory, so that their copy to the GPU is asynchronous.

Why not DALI's parallel per-sample external source: it drops a partial last batch, and its
worker processes would fork a process that may hold CUDA and the training threads. Reading
bytes and a header costs ~0.1 ms an image against several ms to decode, so feeding from the
main process (with reads in threads) does not hold DALI back.

Bad images: whatever the header check rejects never reaches DALI. An image that passes it but
that DALI cannot decode (a broken Huffman table, say) fails its whole DALI batch; the
pipeline is then rebuilt (a few ms), that batch's images are decoded one by one to find the
culprit, which becomes an unreadable image with DALI's message, and the batches that were in
flight are fed again. Either way a bad image goes through the same BadImageBudget as in the
torchvision loader, so a batch loses exactly its unreadable images and no position shifts.

Pipelines are built once per (pass kind, batch size) and reused across epochs; a new pass just
feeds new lists.
"""
from __future__ import annotations

import io
import logging
import subprocess
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from nvidia.dali import Pipeline, fn, types
from nvidia.dali.plugin.pytorch.torch_utils import feed_ndarray, to_torch_tensor
from nvidia.dali.tensors import TensorGPU
from PIL import Image

from dcluster.core.config import ConfigError, DataConfig
from dcluster.data.badfiles import BadImageBudget, Unreadable, load_or_unreadable
from dcluster.data.decode import BadImageError, decode_rgb, peek_size
from dcluster.data.pipelines import FeatureBatch, TrainBatch, as_index_array, check_train_inputs
from dcluster.data.source import ImageSource
from dcluster.data.crops import (Augmentation, View, center_crop_origin, normalization,
                                 resized_shorter_side, sample_generator, training_views)

log = logging.getLogger("dcluster.data")

# Batches DALI works on while the caller uses the current one (its prefetch queue depth),
# and batches read ahead of those: enough that a slow read or a slow decode of one batch is
# absorbed by the others.
_PREFETCH = 3
# Share of the JPEG decoding nvJPEG gives the hardware decoder where the GPU has one (A100,
# H100; 0.7 is what NVIDIA's MLPerf ResNet-50 runs use), the rest to CUDA kernels.
HW_DECODER_LOAD = 0.7
_FEATURE, _TRAIN = "feature", "train"
_ENCODED = "encoded"

# Per-sample DALI arguments by name (see _define), from an image's (height, width, position,
# global index).
Recipe = Callable[[int, int, int, int], dict[str, np.ndarray]]


def feature_recipe(resize_size: int, crop: int) -> Recipe:
    """The centre crop of the resized image, expressed as the region of the original image it
    covers, so that DALI resizes only the pixels that are kept. The output pixels sample the
    image at the same points as resize-then-crop (FeatureTransform)."""
    def args(height: int, width: int, position: int, index: int) -> dict[str, np.ndarray]:
        new_h, new_w = resized_shorter_side(height, width, resize_size)
        top, left = center_crop_origin(new_h, new_w, crop)
        sy, sx = height / new_h, width / new_w
        return {"roi_start": np.array([top * sy, left * sx], np.float32),
                "roi_end": np.array([(top + crop) * sy, (left + crop) * sx], np.float32)}
    return args


def train_recipe(augmentation: Augmentation, seed: int, epoch: int,
                 view: Optional[int] = None) -> Recipe:
    """TrainTransform's rotation, crop and flip, drawn from the same generator (the angle is
    fed only to a graph that rotates: see _define); ``view`` keys one view of multi-crop."""
    def args(height: int, width: int, position: int, index: int) -> dict[str, np.ndarray]:
        p = augmentation.sample(sample_generator(seed, epoch, position, index, view),
                                height, width)
        fed = {"anchor": np.array([p.left, p.top], np.float32),  # DALI's "WH" order
               "shape": np.array([p.width, p.height], np.float32),
               "mirror": np.array(int(p.flip), np.int32)}
        if augmentation.rotates:
            fed["angle"] = np.array(p.angle, np.float32)
        return fed
    return args


def multicrop_recipe(views: Sequence[View], seed: int, epoch: int) -> Recipe:
    """Multi-crop (``data.crops``): each view's train_recipe under its own names (anchor0,
    shape0, mirror0, anchor1...), as MultiViewTransform draws them."""
    singles = [train_recipe(view.augmentation, seed, epoch, view.number) for view in views]

    def args(height: int, width: int, position: int, index: int) -> dict[str, np.ndarray]:
        fed: dict[str, np.ndarray] = {}
        for number, single in enumerate(singles):
            fed.update({f"{name}{number}": value
                        for name, value in single(height, width, position, index).items()})
        return fed
    return args


def _multicrop_views(encoded, common: dict, view_sizes: Sequence[int], rotate: bool) -> list:
    """The views of a multi-crop training graph, each (before normalisation) with its mirror
    flag: the image is decoded whole once, then each view rotated (if ``rotate``), cut out
    (fn.slice of the fed window) and resized to its side."""
    whole = fn.decoders.image(encoded, **common)
    window = dict(normalized_anchor=False, normalized_shape=False)
    views = []
    for number, size in enumerate(view_sizes):
        anchor = fn.external_source(name=f"anchor{number}", dtype=types.FLOAT, ndim=1)
        shape = fn.external_source(name=f"shape{number}", dtype=types.FLOAT, ndim=1)
        mirror = fn.external_source(name=f"mirror{number}", dtype=types.INT32, ndim=0)
        image = whole
        if rotate:
            angle = fn.external_source(name=f"angle{number}", dtype=types.FLOAT, ndim=0)
            image = fn.rotate(whole, angle=angle, keep_size=True, fill_value=0,
                              interp_type=types.INTERP_LINEAR)
        image = fn.resize(fn.slice(image, anchor, shape, **window), size=[size, size],
                          antialias=True, interp_type=types.INTERP_LINEAR)
        views.append((image, mirror))
    return views


def _define(kind: str, batch_size: int, threads: int, device_id: Optional[int], crop: int,
            grayscale_stats: bool, roi_decode: bool = True, rotate: bool = False,
            view_sizes: Sequence[int] = ()) -> Pipeline:
    """The DALI graph of one pass kind; ``device_id`` None runs it all on the CPU.
    ``roi_decode`` False: the training crop is cut from the fully decoded image (fn.slice,
    the same anchor and shape in the same "WH" order) instead of decoding only its window,
    for GPUs whose window decode is broken (:func:`probe_roi_decode`). ``rotate``: the whole
    decoded image is first rotated by the fed angle (fn.rotate: counter-clockwise on the
    screen, as torchvision's rotate; the canvas kept, corners black), so the window cannot be
    decoded alone. ``view_sizes`` (multi-crop training): one output per view, of these sides
    (see :func:`_multicrop_views`); empty: the one output of side ``crop``."""
    mean, std = normalization(grayscale_stats)
    decoder = "cpu" if device_id is None else "mixed"
    pipe = Pipeline(batch_size=batch_size, num_threads=threads, device_id=device_id,
                    prefetch_queue_depth=_PREFETCH)
    with pipe:
        encoded = fn.external_source(name=_ENCODED, dtype=types.UINT8, ndim=1)
        # Orientation left alone: the crop windows are drawn for the stored size, as PIL sees it.
        common = dict(device=decoder, output_type=types.RGB, adjust_orientation=False)
        if decoder == "mixed":
            common.update(hw_decoder_load=HW_DECODER_LOAD)
        if kind == _TRAIN and view_sizes:
            views = _multicrop_views(encoded, common, view_sizes, rotate)
        elif kind == _TRAIN:
            anchor = fn.external_source(name="anchor", dtype=types.FLOAT, ndim=1)
            shape = fn.external_source(name="shape", dtype=types.FLOAT, ndim=1)
            mirror = fn.external_source(name="mirror", dtype=types.INT32, ndim=0)
            window = dict(normalized_anchor=False, normalized_shape=False)
            if rotate:
                angle = fn.external_source(name="angle", dtype=types.FLOAT, ndim=0)
                whole = fn.rotate(fn.decoders.image(encoded, **common), angle=angle,
                                  keep_size=True, fill_value=0, interp_type=types.INTERP_LINEAR)
                images = fn.slice(whole, anchor, shape, **window)
            elif roi_decode:  # ROI decoding: only the crop window is decoded
                images = fn.decoders.image_slice(encoded, anchor, shape, **window, **common)
            else:
                images = fn.slice(fn.decoders.image(encoded, **common), anchor, shape, **window)
            images = fn.resize(images, size=[crop, crop], antialias=True,
                               interp_type=types.INTERP_LINEAR)
            views = [(images, mirror)]
        else:
            roi_start = fn.external_source(name="roi_start", dtype=types.FLOAT, ndim=1)
            roi_end = fn.external_source(name="roi_end", dtype=types.FLOAT, ndim=1)
            images = fn.decoders.image(encoded, **common)
            images = fn.resize(images, size=[crop, crop], roi_start=roi_start, roi_end=roi_end,
                               antialias=True, interp_type=types.INTERP_LINEAR)
            views = [(images, 0)]
        pipe.set_outputs(*(fn.crop_mirror_normalize(
            images, mirror=mirror, mean=[m * 255 for m in mean], std=[s * 255 for s in std],
            output_layout="CHW", dtype=types.FLOAT) for images, mirror in views))
    pipe.build()
    return pipe


class _Sample(NamedTuple):
    index: int
    encoded: np.ndarray  # uint8 view of the file's bytes
    args: dict[str, np.ndarray]


@dataclass
class _Chunk:
    """One batch of positions: what goes to DALI and what was already found unreadable."""
    samples: list[_Sample]
    unreadable: list[Unreadable]
    end_position: int


def _peeked(data: bytes, index: int, path: str) -> tuple[bytes, int, int]:
    return (data, *peek_size(data, index, path))


def _dali_reason(err: Exception) -> str:
    """The line of a DALI error that says what went wrong, without its graph traceback."""
    text = str(err)
    tail = text.split("encountered:", 1)[-1]
    lines = [line.strip() for line in tail.splitlines()
             if line.strip() and not line.startswith(("Current pipeline", "C++ context"))]
    return "DALI cannot decode it: " + (" ".join(lines)[:300] or type(err).__name__)


def _explain(err: Exception, sample: _Sample, path: str) -> str:
    """DALI's reason, with Pillow's verdict on the same bytes: DALI's messages rarely say
    more than which sample of the batch failed."""
    try:
        decode_rgb(sample.encoded.tobytes(), sample.index, path)
        pillow = "Pillow decodes it"
    except BadImageError as pil_err:
        pillow = f"Pillow: {pil_err.reason}"
    return f"{_dali_reason(err)} ({pillow})"


def _tiny_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (128, 128, 128)).save(buffer, format="JPEG")
    return buffer.getvalue()


class _Runner:
    """A built pipeline, driven one batch per ``submit`` and one ``result`` per batch.

    DALI's first ``schedule_run`` runs ``_PREFETCH`` iterations and wants that many batches
    fed; every later one runs one. Priming with tiny dummy batches right after building puts
    the pipeline in that steady state, so a pass of any length (one batch included) can be fed
    batch by batch.
    """

    def __init__(self, build: Callable[[], Pipeline], recipe: Recipe) -> None:
        self.pipe = build()
        self.pending = 0  # batches submitted and not yet collected
        dummy = _tiny_jpeg()
        sample = _Sample(-1, np.frombuffer(dummy, np.uint8), recipe(8, 8, 0, 0))
        for _ in range(_PREFETCH):
            self._feed([sample])
        self.pipe.schedule_run()
        for _ in range(_PREFETCH):
            self.pipe.outputs()

    def _feed(self, samples: list[_Sample]) -> None:
        self.pipe.feed_input(_ENCODED, [s.encoded for s in samples])
        for name in samples[0].args:
            self.pipe.feed_input(name, [s.args[name] for s in samples])

    def submit(self, samples: list[_Sample]) -> None:
        self._feed(samples)
        self.pipe.schedule_run()
        self.pending += 1

    def result(self) -> list[torch.Tensor]:
        """The batch's outputs: one (B, 3, size, size) tensor per view."""
        self.pending -= 1
        return [_owned_copy(images.as_tensor()) for images in self.pipe.outputs()]


def _owned_copy(images) -> torch.Tensor:
    """A torch copy of a DALI output (DALI reuses its buffers): on the GPU, on torch's current
    stream; on the host, in pinned memory when this process has a GPU to copy it to (torch's
    caching host allocator recycles the pinned blocks, so this costs no allocation a batch)."""
    if isinstance(images, TensorGPU) or not torch.cuda.is_available():
        return to_torch_tensor(images, copy=True)
    out = torch.empty(images.shape(), dtype=torch.float32, pin_memory=True)
    feed_ndarray(images, out)
    return out


@dataclass
class _Decoded:
    views: list[torch.Tensor]  # one per output of the graph
    indices: torch.Tensor
    end_position: int


@dataclass
class _Pass:
    """The batches in flight of one pass and the runner they were fed to."""
    runner: _Runner
    new_runner: Callable[[], _Runner]
    budget: BadImageBudget
    describe: Callable[[int], str]
    rejected: dict[int, Unreadable]  # images DALI failed on, kept from one pass to the next
    in_flight: deque = field(default_factory=deque)  # of _Chunk, oldest first

    def scheduled(self) -> int:
        return sum(1 for chunk in self.in_flight if chunk.samples)

    def add(self, chunk: _Chunk) -> None:
        if chunk.samples:
            self.runner.submit(chunk.samples)
        self.in_flight.append(chunk)

    def finish_oldest(self) -> Optional[_Decoded]:
        chunk = self.in_flight.popleft()
        self.budget.record_all(chunk.unreadable)
        if not chunk.samples:
            return None
        try:
            views, samples = self.runner.result(), chunk.samples
        except RuntimeError as err:
            views, samples = self._recover(chunk, err)
            if not samples:
                return None
        indices = torch.tensor([s.index for s in samples], dtype=torch.int64)
        return _Decoded(views, indices, chunk.end_position)

    def _recover(self, chunk: _Chunk,
                 err: RuntimeError) -> tuple[list[torch.Tensor], list[_Sample]]:
        """After DALI failed a batch: decode its images one by one on a fresh pipeline, record
        the ones that fail, and feed the fresh pipeline the batches that were in flight."""
        log.warning("DALI failed a batch of %d images (%s); decoding them one by one to find "
                    "the unreadable ones", len(chunk.samples), _dali_reason(err))
        self.runner = self.new_runner()
        images, good = [], []
        for sample in chunk.samples:
            try:
                self.runner.submit([sample])
                images.append(self.runner.result())
                good.append(sample)
            except RuntimeError as single:
                path = self.describe(sample.index)
                bad = Unreadable(sample.index, path, _explain(single, sample, path))
                self.rejected[bad.index] = bad
                self.runner = self.new_runner()
                self.budget.record_all([bad])
        for later in self.in_flight:
            if later.samples:
                self.runner.submit(later.samples)
        if not images:
            return [torch.empty(0)], good
        return [torch.cat(view) for view in zip(*images)], good

    def drain(self) -> bool:
        """Collect what is still in flight (a pass abandoned half way), so the pipeline can
        serve the next pass; False if that failed and the pipeline must not be reused."""
        self.in_flight.clear()
        try:
            while self.runner.pending:
                self.runner.result()
        except RuntimeError:
            return False
        return True


class DaliPipelines:
    """Feature and training passes decoded and augmented by DALI (see the module docstring).

    ``data_cfg.workers`` threads (at least one) decode in DALI and as many read the bytes.
    """

    def __init__(self, source: ImageSource, data_cfg: DataConfig, seed: int) -> None:
        self.source = source
        self.cfg = data_cfg
        self.seed = seed
        self.bad_indices: dict[int, str] = {}
        self.threads = max(1, data_cfg.workers)
        self.device_id = _decode_device(data_cfg.decode_device)
        self.roi_decode = True
        if self.device_id is not None:
            self.roi_decode = roi_decode_choice(probe_roi_decode(self.device_id))
        self._idle: dict[tuple[str, int], _Runner] = {}
        self._rejected: dict[int, Unreadable] = {}  # not fed to DALI again
        self._readers = ThreadPoolExecutor(self.threads, thread_name_prefix="dcluster-read")
        if self.device_id is None:
            log.info("DALI: decoding and augmenting on the CPU, %d threads", self.threads)
        else:
            log.info("DALI: decoding with nvJPEG and augmenting on GPU %d (%d CPU threads)",
                     self.device_id, self.threads)

    def feature_batches(self, indices: Sequence[int], batch_size: int) -> Iterator[FeatureBatch]:
        array = as_index_array(indices, len(self.source), "feature pass indices")
        recipe = feature_recipe(self.cfg.resize_size, self.cfg.crop_size)
        for batch in self._run(_FEATURE, recipe, array, 0, batch_size):
            yield FeatureBatch(images=batch.views[0], indices=batch.indices)

    def train_batches(self, order: Sequence[int], epoch: int, batch_size: int,
                      start_position: int = 0) -> Iterator[TrainBatch]:
        """As TorchvisionPipelines.train_batches, with the same crops up to decoder rounding."""
        array = check_train_inputs(order, start_position, len(self.source))
        if self.cfg.crops:
            recipe = multicrop_recipe(training_views(self.cfg), self.seed, epoch)
        else:
            recipe = train_recipe(Augmentation.of(self.cfg), self.seed, epoch)
        for batch in self._run(_TRAIN, recipe, array, start_position, batch_size):
            yield TrainBatch(views=batch.views, indices=batch.indices,
                             next_position=batch.end_position)

    def _new_runner(self, kind: str, batch_size: int, recipe: Recipe) -> _Runner:
        sizes = [view.size for view in training_views(self.cfg)] if self.cfg.crops else []
        return _Runner(lambda: _define(kind, batch_size, self.threads, self.device_id,
                                       self.cfg.crop_size, self.cfg.grayscale_stats,
                                       self.roi_decode, Augmentation.of(self.cfg).rotates,
                                       sizes if kind == _TRAIN else ()),
                       recipe)

    def _run(self, kind: str, recipe: Recipe, indices: np.ndarray, start: int,
             batch_size: int) -> Iterator[_Decoded]:
        key = (kind, batch_size)
        # A pass takes the idle pipeline of its kind (a second pass running at the same time
        # builds its own) and gives it back only if it ends in a clean state.
        runner = self._idle.pop(key, None) or self._new_runner(kind, batch_size, recipe)
        state = _Pass(runner, lambda: self._new_runner(kind, batch_size, recipe),
                      BadImageBudget(len(indices) - start, self.cfg.max_bad_fraction,
                                     self.bad_indices), self.source.describe, self._rejected)
        reusable = False
        try:
            for chunk in self._chunks(indices, start, batch_size, recipe):
                state.add(chunk)
                while state.in_flight and (state.scheduled() >= _PREFETCH
                                           or not state.in_flight[0].samples):
                    decoded = state.finish_oldest()
                    if decoded is not None:
                        yield decoded
            while state.in_flight:
                decoded = state.finish_oldest()
                if decoded is not None:
                    yield decoded
            state.budget.log_summary()
            reusable = True
        finally:
            if not reusable:
                reusable = state.drain()
            if reusable:
                self._idle[key] = state.runner

    def _chunks(self, indices: np.ndarray, start: int, batch_size: int,
                recipe: Recipe) -> Iterator[_Chunk]:
        """The batches of positions, read and checked in the reader threads ``_PREFETCH``
        batches ahead, so the reads of the next batches overlap DALI's decoding and the
        caller's work."""
        def prepare(position: int) -> Union[_Sample, Unreadable]:
            index = int(indices[position])
            if index in self._rejected:
                return self._rejected[index]
            loaded = load_or_unreadable(self.source, index, _peeked)
            if isinstance(loaded, Unreadable):
                return loaded
            data, height, width = loaded
            return _Sample(index, np.frombuffer(data, np.uint8),
                           recipe(height, width, position, index))

        def collect(end: int, results: Iterator[Union[_Sample, Unreadable]]) -> _Chunk:
            items = list(results)
            return _Chunk([s for s in items if isinstance(s, _Sample)],
                          [s for s in items if isinstance(s, Unreadable)], end)

        ahead: deque = deque()
        for first in range(start, len(indices), batch_size):
            end = min(first + batch_size, len(indices))
            ahead.append((end, self._readers.map(prepare, range(first, end))))
            if len(ahead) > _PREFETCH:
                yield collect(*ahead.popleft())
        while ahead:
            yield collect(*ahead.popleft())


def _decode_device(choice: str) -> Optional[int]:
    """The CUDA device DALI decodes on, or None for the CPU: the GPU this process trains on
    (the current device, which the distributed set-up picks per rank) when there is one."""
    has_gpu = torch.cuda.is_available()
    if choice == "gpu" and not has_gpu:
        raise ConfigError("config key 'data.decode_device' = 'gpu': this process sees no CUDA "
                          "GPU; use data.decode_device=auto or cpu")
    if choice == "cpu" or not has_gpu:
        return None
    return torch.cuda.current_device()


# ---------------------------------------------------------------- the GPU window-decode probe
#
# DALI 2.4.0 requires nvImageCodec 0.9, whose GPU JPEG region-of-interest decode (the path of
# fn.decoders.image_slice with device="mixed") fails on ordinary in-bounds windows on some
# GPUs: NVIMGCODEC_STATUS_INTERNAL_ERROR on an A100, SIGSEGV on an H100
# (github.com/NVIDIA/nvImageCodec/issues/55, open). Every training image would then be
# "unreadable" and the bad-image budget would stop the run, or the rank would die. So before
# the first pass, one batch of real-sized JPEGs goes through the training graph on the GPU, in
# a child process (a SIGSEGV must not take the rank with it).

PROBE_TIMEOUT_S = 120


class ProbeResult(NamedTuple):
    returncode: int  # negative: killed by that signal
    output: str


def probe_roi_decode(device_id: Optional[int], timeout: float = PROBE_TIMEOUT_S,
                     run: Callable[..., subprocess.CompletedProcess] = subprocess.run
                     ) -> ProbeResult:
    """Decode one batch through the training graph's window decode on GPU ``device_id`` (None:
    the CPU) in a child process (``python -m dcluster.data.dali_loader DEVICE``)."""
    try:
        done = run([sys.executable, "-m", "dcluster.data.dali_loader",
                    "cpu" if device_id is None else str(device_id)],
                   capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return ProbeResult(-1, f"no answer within {timeout:g} s")
    return ProbeResult(done.returncode, (done.stdout + done.stderr).strip())


def roi_decode_choice(probe: ProbeResult) -> bool:
    """Whether the training pass decodes only the crop window on the GPU (the probe passed),
    or decodes whole images and slices them (it failed: said in the log, with why)."""
    if probe.returncode == 0:
        log.info("DALI: GPU window decode (fn.decoders.image_slice) works here")
        return True
    how = (f"killed by signal {-probe.returncode}" if probe.returncode < 0
           else f"exit {probe.returncode}")
    last = probe.output.splitlines()[-1][:300] if probe.output else "no output"
    log.warning("DALI: GPU window decode fails on this GPU (%s: %s; nvImageCodec 0.9, "
                "NVIDIA/nvImageCodec#55): training images are decoded whole on the GPU and "
                "then cropped (fn.slice), which costs decoding time", how, last)
    return False


def _probe_main(device_id: Optional[int]) -> None:
    """One batch of 256 x 320 JPEGs, each with an in-bounds window, through the training
    graph's window decode on ``device_id``; exits non-zero (or dies) if it fails."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (256, 320, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    encoded = np.frombuffer(buffer.getvalue(), np.uint8)
    recipe = train_recipe(Augmentation(min_scale=0.08), seed=0, epoch=0)
    samples = [_Sample(i, encoded, recipe(256, 320, i, i)) for i in range(4)]
    runner = _Runner(lambda: _define(_TRAIN, len(samples), 1, device_id, 224, False), recipe)
    runner.submit(samples)
    (images,) = runner.result()
    assert tuple(images.shape) == (4, 3, 224, 224), images.shape
    print("window decode ok")


if __name__ == "__main__":
    _probe_main(None if sys.argv[1] == "cpu" else int(sys.argv[1]))
