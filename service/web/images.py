"""Key images for the study page: a sagittal and a coronal reformat and an axial slice per
suspected level, in a bone window, with the segmentation outline (from the stored SEG), the
vertebra labels and the suspected region (the level's box) drawn. Rendered server-side once
per analysis from the spooled series and cached as PNG under ``<data_dir>/cache/images``.

Geometry: the volume is indexed (z, y, x) as ``service.imaging.volume`` loads it; images are
shown superior up, the patient's right on the viewer's left (coronal, axial) and anterior on
the left (sagittal), with pixels resampled to square millimetres. Reads only: the DICOM
edge's spool and the result store; never the model.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.config import Settings
from service.db.tables import Analysis, AnalysisState, Finding, Instance, Series
from service.findings import VERTEBRAE
from service.results.store import ResultStore
from service.results.uids import ObjectKind

logger = logging.getLogger(__name__)

BONE_WINDOW = (400.0, 1800.0)
"""(level, width) in HU."""
DISPLAY_WIDTH = 420
VIEW_NAME = re.compile(r"^(sagittal|coronal|axial-C[1-7])$")
SUSPECTED_RGB = (235, 40, 40)
OUTLINE_RGB = {"C1": (80, 200, 255), "C2": (255, 210, 60), "C3": (80, 200, 255),
               "C4": (255, 210, 60), "C5": (80, 200, 255), "C6": (255, 210, 60),
               "C7": (80, 200, 255)}


Box = tuple[str, float, float, float, float]
"""(vertebra, row0, col0, row1, col1) in the unscaled image's pixels."""


class ImagesUnavailable(LookupError):
    """No images for this study: not analysed, or the series left the spool."""


@dataclass(frozen=True)
class Level:
    vertebra: str
    suspected: bool
    probability: float | None
    bbox: tuple[int, int, int, int, int, int] | None
    """(z0, y0, x0, z1, y1, x1), end exclusive, in the loaded volume's voxels."""
    key_slice: int | None


def available_views(levels: list[Level]) -> list[str]:
    return ["sagittal", "coronal"] + [f"axial-{lv.vertebra}" for lv in levels
                                      if lv.suspected and lv.key_slice is not None]


def _levels(findings: list[Finding]) -> list[Level]:
    out = []
    for f in sorted(findings, key=lambda f: f.vertebra):
        if not f.in_view:
            continue
        bbox = tuple(int(v) for v in f.bbox) if f.bbox and len(f.bbox) == 6 else None
        key = f.key_slices[0] if f.key_slices else (
            (bbox[0] + bbox[3]) // 2 if bbox else None)
        out.append(Level(f.vertebra, bool(f.suspected), f.probability,
                         bbox,  # type: ignore[arg-type]
                         int(key) if key is not None else None))
    return out


def _window(hu: np.ndarray) -> np.ndarray:
    level, width = BONE_WINDOW
    low = level - width / 2
    return (np.clip((hu.astype(np.float32) - low) / width, 0, 1) * 255).astype(np.uint8)


def _outline(labels: np.ndarray) -> np.ndarray:
    """Pixels of a labelled region that touch a pixel of another label (4-neighbourhood)."""
    edge = np.zeros(labels.shape, bool)
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    edge[1:, :] |= labels[1:, :] != labels[:-1, :]
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    return edge & (labels > 0)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _compose(gray: np.ndarray, labels: np.ndarray | None, levels: list[Level],
             scale: tuple[float, float], boxes: Sequence[Box],
             title: str) -> Image.Image:
    """``gray`` (rows, cols) uint8 and ``labels`` the same shape (vertebra numbers 1..7);
    ``scale`` (row mm, col mm); ``boxes`` (vertebra, r0, c0, r1, c1) in pixel units."""
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    suspected = {lv.vertebra for lv in levels if lv.suspected}
    if labels is not None:
        edge = _outline(labels)
        for number, vertebra in enumerate(VERTEBRAE, start=1):
            mask = edge & (labels == number)
            if mask.any():
                rgb[mask] = SUSPECTED_RGB if vertebra in suspected else OUTLINE_RGB[vertebra]
    rows, cols = gray.shape
    unit = min(scale)
    height_mm, width_mm = rows * scale[0] / unit, cols * scale[1] / unit
    zoom = DISPLAY_WIDTH / width_mm
    size = (DISPLAY_WIDTH, max(1, round(height_mm * zoom)))
    image = Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR)
    fy, fx = size[1] / rows, size[0] / cols
    draw = ImageDraw.Draw(image)
    font = _font(14)
    for _vertebra, r0, c0, r1, c1 in boxes:
        draw.rectangle([c0 * fx, r0 * fy, c1 * fx, r1 * fy], outline=SUSPECTED_RGB, width=2)
    if labels is not None:
        for number, vertebra in enumerate(VERTEBRAE, start=1):
            where = np.argwhere(labels == number)
            if len(where) == 0:
                continue
            r, c = where.mean(axis=0)
            color = SUSPECTED_RGB if vertebra in suspected else (255, 255, 255)
            x = min(size[0] - 30, where[:, 1].max() * fx + 6)
            draw.text((x, r * fy - 7), vertebra, fill=color, font=font, stroke_width=2,
                      stroke_fill=(0, 0, 0))
    draw.text((6, 4), title, fill=(255, 255, 255), font=font, stroke_width=2,
              stroke_fill=(0, 0, 0))
    return image


def _label_map(seg_path: Path | None, sop_instance_uids: list[str],
               shape: tuple[int, int, int]) -> np.ndarray | None:
    """Vertebra numbers (1..7 = C1..C7) per voxel from the stored SEG, or None."""
    if seg_path is None or not seg_path.is_file():
        return None
    import highdicom as hd

    try:
        seg = hd.seg.segread(seg_path)
        numbers = seg.get_segment_numbers()
        lut = np.zeros(max(numbers) + 1, np.uint8)
        for number in numbers:
            label = str(seg.get_segment_description(number).segment_label).split()[0]
            if label in VERTEBRAE:
                lut[number] = VERTEBRAE.index(label) + 1
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=sop_instance_uids, combine_segments=True,
            skip_overlap_checks=True)
    except Exception as exc:  # noqa: BLE001 - images are a convenience: draw without
        logger.warning("SEG %s unreadable for the study page (%s)", seg_path.name,
                       type(exc).__name__)
        return None
    if pixels.shape != shape:
        return None
    return lut[np.asarray(pixels, dtype=np.intp)]


def render(hu: np.ndarray, spacing: tuple[float, float, float], superior_up: bool,
           labels: np.ndarray | None, levels: list[Level]) -> dict[str, Image.Image]:
    """Every view of one analysis. ``hu`` (z, y, x); ``superior_up``: True when a larger z
    index is more superior (flip so that it is drawn on top)."""
    nz, ny, nx = hu.shape
    if labels is not None and labels.any():
        spine = np.argwhere(labels > 0)
        cy, cx = (int(v) for v in np.median(spine[:, 1:], axis=0))
    else:
        boxes = [lv.bbox for lv in levels if lv.bbox]
        cy = int(np.mean([(b[1] + b[4]) / 2 for b in boxes])) if boxes else ny // 2
        cx = int(np.mean([(b[2] + b[5]) / 2 for b in boxes])) if boxes else nx // 2
    flip = (lambda a: a[::-1]) if superior_up else (lambda a: a)

    def zrow(z: float) -> float:
        return (nz - z) if superior_up else z

    views: dict[str, Image.Image] = {}
    suspected = [lv for lv in levels if lv.suspected and lv.bbox]
    sag_boxes: list[Box] = [
        (lv.vertebra, zrow(lv.bbox[3]), lv.bbox[1], zrow(lv.bbox[0]), lv.bbox[4])
        for lv in suspected if lv.bbox]
    views["sagittal"] = _compose(
        _window(flip(hu[:, :, cx])), flip(labels[:, :, cx]) if labels is not None else None,
        levels, (spacing[0], spacing[1]), sag_boxes, "sagittal")
    cor_boxes: list[Box] = [
        (lv.vertebra, zrow(lv.bbox[3]), lv.bbox[2], zrow(lv.bbox[0]), lv.bbox[5])
        for lv in suspected if lv.bbox]
    views["coronal"] = _compose(
        _window(flip(hu[:, cy, :])), flip(labels[:, cy, :]) if labels is not None else None,
        levels, (spacing[0], spacing[2]), cor_boxes, "coronal")
    for lv in levels:
        if not lv.suspected or lv.key_slice is None or not 0 <= lv.key_slice < nz:
            continue
        z = lv.key_slice
        axial_boxes: list[Box] = ([(lv.vertebra, lv.bbox[1], lv.bbox[2], lv.bbox[4],
                                    lv.bbox[5])] if lv.bbox else [])
        views[f"axial-{lv.vertebra}"] = _compose(
            _window(hu[z]), labels[z] if labels is not None else None, levels,
            (spacing[1], spacing[2]), axial_boxes,
            f"axial {lv.vertebra} (slice {z + 1})")
    return views


def _cache_dir(settings: Settings, analysis_id: int) -> Path:
    return settings.data_dir / "cache" / "images" / str(analysis_id)


def _write_png(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".png.tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            image.save(handle, format="PNG", optimize=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _current(session: Session, series_id: int) -> Analysis | None:
    return session.execute(
        select(Analysis).where(Analysis.series_id == series_id,
                               Analysis.state != AnalysisState.SUPERSEDED)
        .order_by(Analysis.created_at.desc(), Analysis.id.desc()).limit(1)
    ).scalar_one_or_none()


def image_path(session: Session, settings: Settings, series: Series, view: str) -> Path:
    """The cached PNG of ``view`` for the series' current analysis, rendered on first use.

    Raises :class:`ImagesUnavailable` when there is no finished analysis, the view does not
    exist for it, or the series is no longer in the spool.
    """
    if not VIEW_NAME.match(view):
        raise ImagesUnavailable(view)
    analysis = _current(session, series.id)
    if analysis is None or analysis.state != AnalysisState.DONE:
        raise ImagesUnavailable("not analysed")
    cache = _cache_dir(settings, analysis.id)
    path = cache / f"{view}.png"
    if path.is_file():
        return path
    levels = _levels(list(analysis.findings))
    if view not in available_views(levels):
        raise ImagesUnavailable(view)
    paths = [settings.spool_path / p for p in session.execute(
        select(Instance.spool_path).where(Instance.series_id == series.id)
        .order_by(Instance.id)).scalars()]
    if not paths or not all(p.is_file() for p in paths):
        raise ImagesUnavailable("series not in the spool")
    from service.imaging.volume import load_series

    try:
        volume = load_series(paths, settings)
    except Exception as exc:  # noqa: BLE001 - the worker loaded it; a page must not 500
        logger.warning("series %d: volume for images failed (%s)", series.id,
                       type(exc).__name__)
        raise ImagesUnavailable("volume unreadable") from exc
    store = ResultStore.from_settings(settings)
    seg_path = next((p for kind in (ObjectKind.SEG, ObjectKind.SEG_LABELMAP)
                     if (p := store.path_for(series.series_instance_uid,
                                             analysis.model_version, kind)).is_file()), None)
    labels = (_label_map(seg_path, volume.sop_instance_uids, volume.shape)
              if not volume.resampled else None)
    superior_up = bool(volume.normal[2] > 0)
    for name, image in render(volume.hu, volume.spacing, superior_up, labels, levels).items():
        _write_png(image, cache / f"{name}.png")
    if not path.is_file():
        raise ImagesUnavailable(view)
    return path


def views_for(session: Session, settings: Settings, series: Series | None) -> list[str]:
    """The views the study page can show, without rendering anything (cheap)."""
    if series is None:
        return []
    analysis = _current(session, series.id)
    if analysis is None or analysis.state != AnalysisState.DONE:
        return []
    first = session.execute(select(Instance.spool_path).where(Instance.series_id == series.id)
                            .limit(1)).scalar_one_or_none()
    if first is None or not (settings.spool_path / first).is_file():
        return []
    return available_views(_levels(list(analysis.findings)))
