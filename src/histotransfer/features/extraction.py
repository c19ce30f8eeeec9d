"""Patch feature extraction: tiles read on the fly from the WSI, encoded on the GPU (or CPU).

Each DataLoader worker opens its own slide handle and reads tiles from the level the tiles file names,
resizing them to the tile size; batches travel as uint8 and are normalised on the device by the
encoder itself; channels_last; autocast (bf16 by default) on CUDA; pinned memory. Output per slide:
``{out_dir}/{encoder_id}/{slide_id}.h5`` with ``features`` (n_tiles, dim) aligned with ``coords``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import openslide
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from histotransfer.core.architectures import ARCHS
from histotransfer.core.config import ExtractionConfig
from histotransfer.core.cpus import available_cpus
from histotransfer.core.errors import BundleError, DeviceError, ExportError, LineageError
from histotransfer.core.onnx_runtime import ENCODER_INPUT, ENCODER_OUTPUT, TOLERANCE, check_io, run_session
from histotransfer.core.onnx_runtime import session as ort_session
from histotransfer.features.encoders import Encoder
from histotransfer.features.onnx_encoder import ONNX_MAX_BYTES, encoder_parity, export_encoder, weights_bytes
from histotransfer.io import lineage
from histotransfer.io.assets import cache_dir
from histotransfer.io.atomic import atomic_path
from histotransfer.io.layout import SUMMARY, slide_file
from histotransfer.io.manifest import SlideRecord
from histotransfer.io.provenance import (
    config_hash,
    provenance_attrs,
    record_sha256,
    recorded_sha256,
    sha256_file,
)
from histotransfer.io.runner import StageResult, run_per_slide
from histotransfer.wsi.batches import measured_batches
from histotransfer.wsi.regions import RegionReader, open_regions
from histotransfer.wsi.slides import SlideError, local_slide_path, open_slide
from histotransfer.wsi.tiling import TILE_RESIZE, TileSet, load_tiles, read_tile, tiles_digest

log = logging.getLogger(__name__)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class TileReader(Dataset):
    """The tiles of one slide as uint8 (3, patch, patch) tensors, read lazily from the WSI."""

    def __init__(self, slide_path: Path, tiles: TileSet):
        self.slide_path = Path(slide_path)
        self.tiles = tiles
        self._slide = None
        self._pid = None

    def __len__(self) -> int:
        return len(self.tiles.coords)

    def _handle(self) -> RegionReader:
        if self._pid != os.getpid():  # a handle per process: OpenSlide handles do not survive fork
            self._slide, self._pid = open_regions(open_slide(self.slide_path), self.slide_path), os.getpid()
        return self._slide

    def __getitem__(self, index: int) -> torch.Tensor:
        rgb = read_tile(self._handle(), self.tiles, index)  # (p, p, 3) uint8
        return torch.from_numpy(rgb).permute(2, 0, 1)  # (3, p, p) uint8


def concise_error(exc: Exception) -> str:
    """The message of an error, also when a DataLoader worker wrapped it in a whole traceback."""
    text = str(exc)
    if "Original Traceback" in text:  # the last line is "package.module.ErrorType: message"
        last = next(line for line in reversed(text.strip().splitlines()) if line.strip()).strip()
        kind, sep, message = last.partition(": ")
        return message if sep and re.fullmatch(r"[\w.]+", kind) else last
    return text


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers decode JPEG tiles; the main process owns the cores for the model


BACKENDS = ("torch", "onnxruntime")


@dataclass(frozen=True)
class EngineSettings:
    device: torch.device
    batch_size: int
    num_workers: int | None  # tile readers; None on the CPU: split measured per slide (wsi.batches)
    precision: str  # "fp32", "bf16" or "fp16"; always fp32 on the CPU and with onnxruntime
    backend: str  # "torch" or "onnxruntime"
    backend_chosen: bool = False  # "auto" picked the backend (for_encoder may pick again)

    def for_encoder(self, encoder: Encoder) -> EngineSettings:
        """The settings this encoder runs with: an "auto" ONNX Runtime becomes torch for encoders whose
        weights exceed ONNX's 2 GB single-file limit (a ViT-H or ViT-g: the exported cache entry and
        bundle are one file each). Asked for by name, ONNX Runtime stays, and the export says why not."""
        weights = weights_bytes(encoder.module)
        if self.backend_chosen and self.backend == "onnxruntime" and weights > ONNX_MAX_BYTES:
            log.info(
                "%s: %.1f GB of weights exceed ONNX's 2 GB file: torch runs it", encoder.id, weights / 1e9
            )
            return replace(self, backend="torch")
        return self

    @classmethod
    def resolve(
        cls,
        *,
        device: str | None = None,
        batch_size: int | None = None,
        num_workers: int | None = None,
        precision: str | None = None,
        backend: str | None = None,
    ) -> EngineSettings:
        """Settings from the extraction section's fields (None: the schema's default). Its "auto"s:
        CUDA with torch and bf16 when present; else the CPU with ONNX Runtime (faster there, see
        benchmarks/bench_extract.py); batch 256 on GPU, 32 on CPU; on a GPU a DataLoader worker per
        core (at most 16), on the CPU reader threads split from the cores by measurement (None)."""
        schema = ExtractionConfig.model_fields
        device = device or schema["device"].default
        precision = precision or schema["precision"].default
        backend = backend or schema["backend"].default
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dev = check_device(device)
        cuda = dev.type == "cuda"
        chosen = backend == "auto"
        if chosen:
            backend = "torch" if cuda else "onnxruntime"
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of auto, {', '.join(BACKENDS)}; got {backend!r}")
        asked = precision
        if precision == "auto":
            precision = "bf16" if cuda else "fp32"
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of auto, {', '.join(PRECISIONS)}; got {precision!r}")
        if (not cuda or backend == "onnxruntime") and precision != "fp32":
            if asked != "auto":
                log.warning(
                    "extraction.precision %s applies to torch on a CUDA GPU; %s runs float32", precision, dev
                )
            precision = "fp32"
        workers = num_workers
        if workers is None and cuda:
            workers = min(16, available_cpus())  # the GPU waits on tile decoding: every core reads
        return cls(dev, batch_size or (256 if cuda else 32), workers, precision, backend, chosen)


def check_device(device: str) -> torch.device:
    """``device`` as a torch device that exists on this machine, else a DeviceError saying what does."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise DeviceError(
            f"extraction.device {device!r} is not a device: use auto, cpu, cuda or cuda:N ({exc})"
        ) from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DeviceError(
                f"extraction.device {device!r}: this machine has no CUDA GPU that torch can use "
                "(use --device cpu, or auto to take a GPU only when there is one)"
            )
        if dev.index is not None and dev.index >= count:
            raise DeviceError(
                f"extraction.device {device!r}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}"
            )
    elif dev.type != "cpu":
        raise DeviceError(f"extraction.device {device!r}: only cpu and cuda devices are supported")
    return dev


def settings_from(extraction: ExtractionConfig) -> EngineSettings:
    """Engine settings for the config's extraction section."""
    return EngineSettings.resolve(
        device=extraction.device,
        batch_size=extraction.batch_size,
        num_workers=extraction.num_workers,
        precision=extraction.precision,
        backend=extraction.backend,
    )


class TorchRunner:
    """Batches through the torch module on the device: channels_last, autocast, no host sync.

    A batch that does not fit in the device's memory (a ViT-g at the default GPU batch of 256 on a
    small card) is split in halves until it does, and later batches are split the same way up front:
    the batch that fits is found once, with a warning, instead of failing the slide.
    """

    def __init__(self, encoder: Encoder, settings: EngineSettings):
        self.device = settings.device
        self.module = encoder.module.to(settings.device, memory_format=torch.channels_last).eval()
        dtype = PRECISIONS[settings.precision]
        self._autocast = (
            (lambda: torch.autocast(self.device.type, dtype=dtype)) if dtype else contextlib.nullcontext
        )
        self._non_blocking = self.device.type == "cuda"
        self.max_batch: int | None = None  # the largest batch known to fit, once one did not

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:  # (b, 3, p, p) uint8 -> (b, dim)
        x = batch.to(self.device, non_blocking=self._non_blocking).contiguous(
            memory_format=torch.channels_last
        )
        if self.max_batch is not None and len(x) > self.max_batch:
            return torch.cat([self(part) for part in x.split(self.max_batch)])
        try:
            with torch.inference_mode(), self._autocast():
                return self.module(x).float()
        except torch.OutOfMemoryError:
            if len(x) == 1:
                raise
            self.max_batch = len(x) // 2
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            log.warning(
                "a batch of %d tiles does not fit in %s memory: batches of %d",
                len(x),
                self.device,
                self.max_batch,
            )
            return self(x)


class OrtRunner:
    """Batches through ONNX Runtime: the encoder is exported once per tile size, cached by weights."""

    parity_rtol = TOLERANCE["fp32"]

    def __init__(self, encoder: Encoder, settings: EngineSettings):
        self.encoder = encoder
        self.device = torch.device("cpu")
        self._sessions: dict[int, Any] = {}
        self._providers = (
            ["CUDAExecutionProvider"] if settings.device.type == "cuda" else ["CPUExecutionProvider"]
        )

    def _session(self, tile_px: int):
        """The encoder's session for ``tile_px`` tiles, from the cache when the cached export is the
        one written (sha256 recorded beside it), has this encoder's inputs and outputs and agrees with
        torch; otherwise the entry is exported again, with a warning."""
        if tile_px not in self._sessions:
            enc = self.encoder
            path = cache_dir() / "onnx" / f"{enc.id}-{enc.weights_sha256[:16]}-{tile_px}px.onnx"
            session = None
            if path.is_file():
                try:
                    session = self._verified(path, tile_px)
                except (BundleError, ExportError) as exc:
                    log.warning("ONNX encoder cache entry %s is unusable, exporting it again: %s", path, exc)
            if session is None:
                export_encoder(enc, path, tile_px=tile_px, owned=True)
                record_sha256(path)
                session = self._verified(path, tile_px)
            self._sessions[tile_px] = session
        return self._sessions[tile_px]

    def _verified(self, path: Path, tile_px: int):
        recorded = recorded_sha256(path)
        if recorded != (actual := sha256_file(path)):
            raise BundleError(f"its content (sha256 {actual[:12]}...) is not what was written ({recorded})")
        try:
            # Every core, sleeping rather than spinning between operators: reader threads share them.
            session = ort_session(path, threads=available_cpus(), providers=self._providers, spin=False)
        except Exception as exc:  # onnxruntime raises its own, unexported error types
            raise BundleError(f"ONNX Runtime cannot load it ({type(exc).__name__})") from exc
        inputs = {ENCODER_INPUT: ("tensor(uint8)", [None, 3, tile_px, tile_px])}
        check_io(path, session, inputs, {ENCODER_OUTPUT: [None, self.encoder.dim]})
        self._check_parity(tile_px, path, session)
        return session

    def _check_parity(self, tile_px: int, path: Path, session) -> None:
        """The session extraction will use, checked against torch (one session per file, not two)."""
        probe = np.random.default_rng(0).integers(0, 256, (2, 3, tile_px, tile_px), dtype=np.uint8)
        try:
            encoder_parity(self.encoder, path, [probe], tolerance=self.parity_rtol, sess=session)
        except ExportError as exc:
            raise ExportError(f"{exc}; use backend torch for this encoder") from exc

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:  # (b, 3, p, p) uint8 -> (b, dim)
        tiles = np.ascontiguousarray(batch.numpy())
        return torch.from_numpy(run_session(self._session(tiles.shape[-1]), tiles))


def make_runner(encoder: Encoder, settings: EngineSettings) -> TorchRunner | OrtRunner:
    return (
        OrtRunner(encoder, settings) if settings.backend == "onnxruntime" else TorchRunner(encoder, settings)
    )


def encode_batches(runner, batches, n_tiles: int, dim: int, desc: str = "") -> np.ndarray:
    """Run uint8 batches through a runner; returns (n_tiles, dim) float32 in input order."""
    out = torch.empty((n_tiles, dim), dtype=torch.float32, device=runner.device)
    start = 0
    with tqdm(total=n_tiles, desc=desc or "extract", unit="tile", leave=False, dynamic_ncols=True) as bar:
        for batch in batches:  # (b, 3, p, p) uint8
            out[start : start + len(batch)] = runner(batch)  # (b, dim); stays on the device: no sync
            start += len(batch)
            bar.update(len(batch))
    if start != n_tiles:
        raise RuntimeError(f"expected {n_tiles} tiles, encoded {start}")
    return out.cpu().numpy()


def extract_tiles(
    runner,
    encoder: Encoder,
    slide_path: Path,
    tiles: TileSet,
    settings: EngineSettings,
    split: dict | None = None,
) -> np.ndarray:
    """Features (n_tiles, dim) of one slide's tiles, read on the fly: on the CPU by reader threads
    beside the model (``measured_batches``), on a GPU by DataLoader worker processes into pinned
    memory. ``split``: receives the CPU split measured (see ``measured_batches``)."""
    with open_slide(slide_path) as slide:  # fail here, with a short message, before workers start
        if tiles.lineage is None:
            raise LineageError(
                f"the tiles of {tiles.slide_id} record no lineage (made by an older histotransfer): tile "
                "the cohort again into a new folder, or with --overwrite"
            )
        lineage.check_slide(tiles.lineage, Path(slide_path), slide)  # the slide they were made from
    n = len(tiles.coords)
    if settings.device.type == "cpu":
        batches = measured_batches(
            slide_path,
            tiles,
            batch_size=settings.batch_size,
            readers=settings.num_workers,  # None: measured; 0: read in this thread
            split=split,
        )
        return encode_batches(runner, map(torch.from_numpy, batches), n, encoder.dim, desc=tiles.slide_id)
    workers = settings.num_workers or 0
    loader = DataLoader(
        TileReader(slide_path, tiles),
        batch_size=settings.batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=settings.device.type == "cuda",
        worker_init_fn=_worker_init if workers else None,
        prefetch_factor=4 if workers else None,
        multiprocessing_context="fork" if workers and hasattr(os, "fork") else None,
    )
    return encode_batches(runner, loader, n, encoder.dim, desc=tiles.slide_id)


def _extraction(encoder: Encoder, precision: str) -> dict[str, Any]:
    """The settings that decide an encoder's features (of any tiles)."""
    return {
        "stage": "extract",
        "encoder": encoder.provenance(),
        "precision": precision,
        "tile_resize": TILE_RESIZE,
    }


def _extract_config(encoder: Encoder, tiles_digest: str, precision: str) -> dict[str, Any]:
    """What one slide's features are made from: the settings and the tiles' content (resume redoes a
    slide whose tiles were made again, differently)."""
    return _extraction(encoder, precision) | {"tiles": tiles_digest}


def write_features(
    path: Path, *, features: np.ndarray, tiles: TileSet, encoder: Encoder, settings: EngineSettings
) -> None:
    """Write one slide's features per the contract, atomically, with their lineage."""
    precision = settings.precision
    features = features.astype(np.float32)
    config = _extract_config(encoder, tiles.lineage["digest"], precision)
    made_from = lineage.features_record(
        slide_id=tiles.slide_id,
        tiles=tiles.lineage,
        encoder={"id": str(encoder.id), **encoder.provenance(), "weights_source": encoder.weights_source},
        extraction=config_hash(_extraction(encoder, precision)),
        features=features,
        coords=tiles.coords,
    )
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs.update(provenance_attrs(config))
        f.attrs[lineage.LINEAGE] = lineage.h5_attr(made_from)
        f.attrs.update({k: v for k, v in encoder.provenance().items() if not isinstance(v, list)})
        f.attrs.update(mean=encoder.mean, std=encoder.std, precision=precision, backend=settings.backend)
        f.attrs.update(slide_id=tiles.slide_id)
        f.attrs.update(patch_size_px=tiles.patch_size_px, target_mpp=tiles.target_mpp)
        f.attrs.update(tile_resize=TILE_RESIZE)
        f.create_dataset("features", data=features)  # (n_tiles, dim)
        f.create_dataset("coords", data=tiles.coords)  # (n_tiles, 2) same order as the tiles file


def features_stats(path: Path) -> dict[str, Any]:
    with h5py.File(path, "r") as f:
        return {"n_tiles": f["features"].shape[0], "dim": f["features"].shape[1]}


def extract_cohort(
    records: Sequence[SlideRecord],
    *,
    tiles_dir: Path,
    out_dir: Path,
    encoder: Encoder,
    settings: EngineSettings,
    overwrite: bool = False,
    summary_path: Path | None = None,
) -> StageResult:
    """Extract features for every slide with tiles into ``out_dir`` (the encoder's folder of the study,
    see StudyLayout.features_dir); failures are recorded in ``summary_path`` (default: its summary.csv)."""
    tiles_dir, enc_dir = Path(tiles_dir), Path(out_dir)
    settings = settings.for_encoder(encoder)
    runner = make_runner(encoder, settings)

    def expected_hash(record: SlideRecord) -> str:
        digest = tiles_digest(slide_file(tiles_dir, record.slide_id)) or "missing"
        return config_hash(_extract_config(encoder, digest, settings.precision))

    warned: set[float] = set()

    def work(record: SlideRecord) -> dict[str, Any]:
        tiles = load_tiles(slide_file(tiles_dir, record.slide_id))
        model_mpp = ARCHS[encoder.id.arch].mpp
        if model_mpp and abs(tiles.target_mpp / model_mpp - 1) > 0.2 and tiles.target_mpp not in warned:
            warned.add(tiles.target_mpp)
            log.warning(
                "%s: tiles at %.2f um/px, but its authors extract them at %.2f um/px (tiling.target_mpp)",
                encoder.id,
                tiles.target_mpp,
                model_mpp,
            )
        try:
            features = extract_tiles(runner, encoder, local_slide_path(record.path), tiles, settings)
        except (SlideError, openslide.OpenSlideError, RuntimeError) as exc:
            raise SlideError(concise_error(exc)) from exc
        if not np.isfinite(features).all():
            raise ValueError(f"non-finite features for {record.slide_id} (precision {settings.precision})")
        write_features(
            slide_file(enc_dir, record.slide_id),
            features=features,
            tiles=tiles,
            encoder=encoder,
            settings=settings,
        )
        return {"n_tiles": len(features), "dim": features.shape[1]}

    return run_per_slide(
        records,
        stage=f"extract {encoder.id}",
        output_for=lambda r: slide_file(enc_dir, r.slide_id),
        config_hash_for=expected_hash,
        work=work,
        stats_of=features_stats,
        summary_path=summary_path or enc_dir / SUMMARY,
        overwrite=overwrite,
    )
