"""Procedurally generated handwritten-style glyphs: an Omniglot-like benchmark that needs no files.

Omniglot (Lake et al., "Human-level concept learning through probabilistic program induction",
Science 2015) is the standard few-shot image benchmark; this module imitates its structure
(many classes, few images each, every image a new drawing of the class's strokes) so that
examples, tests and CPU smoke runs need no download.

Each class is a random *prototype* character made of 2-4 pen strokes (straight lines, bent
curves, corners, circular arcs, closed loops and dots; later strokes often start on an earlier
one, as pen strokes of real characters do). Each image of a class redraws the prototype with the
variation of a new writer: noise on every Bezier control point, a small shift of each stroke, a
random affine map (rotation, scale, aspect, shear, translation) and a random pen width. Images are
28x28 by default with ink = 1 on a 0 background, like the standard Omniglot preprocessing
(docs/data-formats.md), so any Omniglot model runs on them unchanged.

Reproducibility. Prototype ``c`` is a pure function of ``(seed, c)`` and image ``i`` of class
``c`` a pure function of ``(seed, c, i)``: random numbers come from numpy's PCG64 streams keyed
by those integers (the same on every platform), and the geometry and rasteriser use only
correctly rounded IEEE operations (``+ - * / sqrt``, ``min``/``max``, no BLAS, no fused
multiply-add). The few ``sin``/``cos``/``tan`` values that prototypes need (their last bit may
differ between math libraries) are snapped to a 2**-20 grid, so the same seed gives the same
bytes on any machine (up to ties with probability ~1e-11 per value).

Usage::

    from tasks.glyphs import GlyphClasses, glyph_splits
    from tasks import TaskSampler, get_tasksets

    train = GlyphClasses(600, images_per_class=20, seed=0)   # a ClassDataset
    sampler = TaskSampler(train, ways=5, shots=1, queries=15, seed=0)
    tasksets = get_tasksets("glyphs", None, ways=5, shots=1, num_train=600)
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TypedDict

import numpy as np
import torch

from tasks.dataset import ClassDataset, ImageTransform, TensorClassDataset

__all__ = ["SPLIT_OFFSETS", "GlyphClasses", "glyph_splits", "save_grid"]

# Class ids of the three splits of glyph_splits live in disjoint ranges, so that test classes do
# not change when the number of training classes does.
SPLIT_OFFSETS = {"train": 0, "validation": 1_000_000_000, "test": 2_000_000_000}

# Stream tags (second entry of the PCG64 seed sequence): one independent stream per purpose.
_PROTOTYPE, _NOISE, _UNIFORM = 0, 1, 2

# Stroke kinds and their probabilities in a prototype.
_KINDS = ("line", "curve", "corner", "arc", "loop", "dot")
_KIND_P = np.array([0.24, 0.26, 0.18, 0.18, 0.09, 0.05])

# Prototype extent after normalisation (glyph units); the canvas shows about [-1.3, 1.3].
_EXTENT = 0.8
# Pixels per glyph unit, as a fraction of the image size.
_PX_PER_UNIT = 0.42
# Target length (pixels) of the line segments a stroke is flattened into.
_SEGMENT_PX = 2.0
# Rasteriser work (segments x window pixels) per chunk of images: bounds temporary memory.
_CHUNK_CELLS = 1 << 20


def _snap(x: float) -> float:
    """Round to a 2**-20 grid so that libm last-bit differences of sin/cos/tan disappear."""
    return round(x * 1048576.0) / 1048576.0


def _unit(angle: float) -> np.ndarray:
    return np.array([_snap(math.cos(angle)), _snap(math.sin(angle))])


def _arc_controls(angles: tuple[float, float], n_pieces: int) -> np.ndarray:
    """Cubic Bezier control points ``[3n+1, 2]`` of a unit-circle arc from ``a0`` to ``a1``.

    Each piece spans at most 90 degrees with handle length ``4/3 tan(span/4)``, the standard
    approximation (max radial error 2.7e-4 of the radius).
    """
    a0, a1 = angles
    step = (a1 - a0) / n_pieces
    k = _snap(4.0 / 3.0 * math.tan(step / 4.0))
    pts = [_unit(a0)]
    for j in range(n_pieces):
        s, e = a0 + j * step, a0 + (j + 1) * step
        ps, pe = _unit(s), _unit(e)
        ts, te = np.array([-ps[1], ps[0]]), np.array([-pe[1], pe[0]])
        pts += [ps + k * ts, pe - k * te, pe]
    return np.stack(pts)


def _point_on(path: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random anchor point (piece end) of an existing stroke."""
    anchors = path[::3]
    return anchors[int(rng.integers(len(anchors)))].copy()


def _stroke(kind: str, start: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    """Control points ``[3P+1, 2]`` of one stroke (a chain of P cubic Bezier pieces)."""
    p0 = rng.uniform(-0.8, 0.8, size=2) if start is None else start
    direction = rng.uniform(0.0, 2.0 * math.pi)
    d = _unit(direction)
    normal = np.array([-d[1], d[0]])
    if kind == "line":
        p1 = p0 + rng.uniform(0.6, 1.6) * d
        return np.stack([p0, p0 + (p1 - p0) / 3.0, p0 + 2.0 * (p1 - p0) / 3.0, p1])
    if kind == "curve":
        length = rng.uniform(0.7, 1.7)
        p1 = p0 + length * d
        b1, b2 = rng.uniform(-0.7, 0.7, size=2) * length
        return np.stack(
            [p0, p0 + (p1 - p0) / 3.0 + b1 * normal, p0 + 2.0 * (p1 - p0) / 3.0 + b2 * normal, p1]
        )
    if kind == "corner":
        turn = rng.uniform(math.radians(50), math.radians(150)) * rng.choice([-1.0, 1.0])
        d2 = _unit(direction + turn)
        p1 = p0 + rng.uniform(0.5, 1.2) * d
        p2 = p1 + rng.uniform(0.5, 1.2) * d2
        return np.stack(
            [p0, p0 + (p1 - p0) / 3.0, p0 + 2 * (p1 - p0) / 3.0, p1]
            + [p1 + (p2 - p1) / 3.0, p1 + 2 * (p2 - p1) / 3.0, p2]
        )
    if kind in ("arc", "loop"):
        if kind == "arc":
            radius = np.array([1.0, 1.0]) * rng.uniform(0.25, 0.65)
            span = rng.uniform(math.radians(90), math.radians(300)) * rng.choice([-1.0, 1.0])
        else:
            radius = rng.uniform(0.2, 0.5, size=2)
            span = 2.0 * math.pi * rng.choice([-1.0, 1.0])
        n_pieces = max(1, math.ceil(abs(span) / (math.pi / 2) - 1e-9))
        unit = _arc_controls((direction, direction + span), n_pieces) * radius
        # Translate so that the stroke starts at p0 (the pen starts where it touches down).
        return unit - unit[0] + p0
    if kind == "dot":
        p1 = p0 + 0.06 * d
        return np.stack([p0, p0 + (p1 - p0) / 3.0, p0 + 2.0 * (p1 - p0) / 3.0, p1])
    raise ValueError(f"unknown stroke kind {kind!r}")


@functools.lru_cache(maxsize=256)
def _bezier_weights(n: int) -> np.ndarray:
    """Cubic Bernstein weights ``[n, 4]`` at ``t = 0, 1/n, ..., (n-1)/n`` (read-only, cached)."""
    t = np.arange(n, dtype=np.float64) / n
    s = 1.0 - t
    w = np.stack([s * s * s, 3.0 * s * s * t, 3.0 * s * t * t, t * t * t], axis=1)
    w.flags.writeable = False
    return w


class _GlyphOptions(TypedDict):
    """The validated drawing options of :class:`GlyphClasses` (its constructor's arguments)."""

    strokes: tuple[int, int]
    rotation: float
    scale: tuple[float, float]
    aspect: float
    shear: float
    translation: float
    point_noise: float
    stroke_shift: float
    stroke_width: tuple[float, float]
    width_jitter: float


class _Prototype:
    """A class prototype: strokes as Bezier control points plus a fixed sampling plan."""

    def __init__(self, paths: list[np.ndarray], px_per_unit: float) -> None:
        self.paths = paths
        self.controls = np.concatenate(paths)  # [n_ctrl, 2]
        self.num_strokes = len(paths)
        self.stroke_of_ctrl = np.concatenate(
            [np.full(len(p), s, dtype=np.int64) for s, p in enumerate(paths)]
        )
        # Sampling plan: each sample point is sum_r w[:, r] * controls[idx[:, r]]. Pieces are
        # cut into segments of ~_SEGMENT_PX pixels using the control polygon length (an upper
        # bound on the curve length), with margin for the instance jitter.
        idx, w, stroke_of_pt, offset = [], [], [], 0
        for s, p in enumerate(paths):
            n_pieces = (len(p) - 1) // 3
            for j in range(n_pieces):
                c = p[3 * j : 3 * j + 4]
                poly = float(np.sqrt(((c[1:] - c[:-1]) ** 2).sum(axis=1)).sum())
                n = max(1, math.ceil(1.15 * poly * px_per_unit / _SEGMENT_PX))
                idx.append(np.tile(offset + 3 * j + np.arange(4), (n, 1)))
                w.append(_bezier_weights(n))
                stroke_of_pt.append(np.full(n, s))
            # The stroke's end point.
            idx.append(np.array([[offset + len(p) - 1] * 4]))
            w.append(np.array([[0.0, 0.0, 0.0, 1.0]]))
            stroke_of_pt.append(np.array([s]))
            offset += len(p)
        self.idx = np.concatenate(idx).astype(np.int64)
        self.weights = np.concatenate(w)
        stroke = np.concatenate(stroke_of_pt)  # the stroke of each sample point
        # A segment joins consecutive sample points of the same stroke.
        self.segment_ok: np.ndarray = stroke[1:] == stroke[:-1]
        self.stroke_of_segment = stroke[:-1][self.segment_ok]

    def sample(self, controls: np.ndarray) -> np.ndarray:
        """Sample points ``[I, n_pts, 2]`` of instance control points ``[I, n_ctrl, 2]``."""
        out = self.weights[None, :, 0, None] * controls[:, self.idx[:, 0]]
        for r in range(1, 4):
            out = out + self.weights[None, :, r, None] * controls[:, self.idx[:, r]]
        return out


def _make_prototype(
    rng: np.random.Generator, strokes: tuple[int, int], px_per_unit: float
) -> _Prototype:
    """Draw a random character: 2-4 strokes, normalised to fill a fixed box."""
    n_strokes = int(rng.integers(strokes[0], strokes[1] + 1))
    paths: list[np.ndarray] = []
    for _ in range(n_strokes):
        kind = _KINDS[int(rng.choice(len(_KINDS), p=_KIND_P))]
        start = _point_on(paths[int(rng.integers(len(paths)))], rng) if paths else None
        if paths and rng.random() < 0.45:
            start = None  # a free-standing stroke
        paths.append(_stroke(kind, start, rng))
    # Normalise: centre the bounding box of the drawn curves and scale its longer side to
    # 2 * _EXTENT (capped, so that a tiny glyph is not blown up into a blob).
    w = _bezier_weights(16)
    pieces = np.stack([p[3 * j : 3 * j + 4] for p in paths for j in range((len(p) - 1) // 3)])
    # Explicit sums rather than matmul: BLAS may fuse multiply-adds differently per platform.
    pts = w[None, :, 0, None] * pieces[:, None, 0]
    for r in range(1, 4):
        pts = pts + w[None, :, r, None] * pieces[:, None, r]
    pts = np.concatenate([pts.reshape(-1, 2), pieces[:, 3]])
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    centre = (lo + hi) / 2.0
    scale = min(2.0 * _EXTENT / max(float((hi - lo).max()), 1e-6), 3.0)
    return _Prototype([(p - centre) * scale for p in paths], px_per_unit)


def _rasterise(
    points: np.ndarray, segment_ok: np.ndarray, half_width: np.ndarray, size: int
) -> np.ndarray:
    """Draw polylines with round pens; return uint8 images ``[I, size, size]``.

    ``points`` are ``[I, n, 2]`` pixel coordinates (x = column, y = row, pixel centres at
    integers), ``segment_ok`` marks which consecutive pairs are segments, ``half_width`` is
    ``[I, m]`` per segment. Ink of a pixel is ``clip(h + 1/2 - d, 0, 1)`` with ``d`` its distance
    to the nearest segment (an analytic one-pixel antialiasing ramp), maximised over segments.
    Each segment only visits the pixel window its ink can reach, so cost scales with stroke
    length, not with the image area.
    """
    n_img = points.shape[0]
    a = points[:, :-1][:, segment_ok]
    b = points[:, 1:][:, segment_ok]
    u = b - a
    len2 = (u * u).sum(axis=-1)
    mid = (a + b) / 2.0
    reach = float(np.sqrt(len2.max())) / 2.0 + float(half_width.max()) + 0.5
    radius = math.ceil(reach)
    offsets = np.arange(2 * radius + 2, dtype=np.float64)
    base = np.floor(mid) - radius  # [I, m, 2]
    cols = base[..., 0, None] + offsets  # [I, m, W]
    rows = base[..., 1, None] + offsets
    # The [I, m, W, W] arrays dominate the cost: float32, and everything that is separable in
    # rows and columns is computed on [I, m, W] first. (All operations are correctly rounded
    # IEEE ones, so float32 is as reproducible as float64.)
    f4 = np.float32
    dx = (cols - a[..., 0, None]).astype(f4)[..., None, :]  # [I, m, 1, W]
    dy = (rows - a[..., 1, None]).astype(f4)[..., :, None]  # [I, m, W, 1]
    ux, uy = u[..., 0, None, None].astype(f4), u[..., 1, None, None].astype(f4)
    inv = (1.0 / np.maximum(len2, 1e-12)).astype(f4)[..., None, None]
    t = (dx * (ux * inv)) + (dy * (uy * inv))
    np.clip(t, 0.0, 1.0, out=t)
    ex = dx - t * ux
    ey = dy - t * uy
    ex *= ex
    ey *= ey
    ex += ey
    np.sqrt(ex, out=ex)
    ink = np.subtract((half_width + 0.5).astype(f4)[..., None, None], ex, out=ex)
    np.clip(ink, 0.0, 1.0, out=ink)
    # Scatter with max into the canvas. Pixels outside it get zero ink and a clipped index.
    ci, ri = cols.astype(np.int64), rows.astype(np.int64)
    col_in = ((ci >= 0) & (ci < size))[..., None, :]
    row_in = ((ri >= 0) & (ri < size))[..., :, None]
    ink *= col_in & row_in
    img = np.arange(n_img, dtype=np.int64)[:, None, None]
    flat = ((img * size + np.clip(ri, 0, size - 1)) * size)[..., :, None] + np.clip(
        ci, 0, size - 1
    )[..., None, :]
    canvas = np.zeros(n_img * size * size, dtype=f4)
    np.maximum.at(canvas, flat.ravel(), ink.ravel())
    canvas = canvas.reshape(n_img, size, size)
    return np.floor(canvas * f4(255.0) + f4(0.5)).astype(np.uint8)


def _check_range(name: str, value: Sequence[float], low: float, high: float) -> tuple[float, float]:
    lo, hi = (float(v) for v in value)
    if not (low <= lo <= hi <= high):
        raise ValueError(
            f"{name} must be an interval (lo, hi) with {low} <= lo <= hi <= {high}; got {value}"
        )
    return lo, hi


def _check_nonneg(name: str, value: float, high: float) -> float:
    if not 0.0 <= float(value) <= high:
        raise ValueError(f"{name} must be between 0 and {high}; got {value}")
    return float(value)


class GlyphClasses(TensorClassDataset):
    """``num_classes`` procedurally generated glyph classes, pre-rendered as uint8 images.

    Class ``c`` uses prototype id ``class_offset + c``; prototype id ``k`` is a pure function of
    ``(seed, k)`` and image ``i`` of it of ``(seed, k, i)`` (so a dataset with more images per
    class extends, rather than changes, one with fewer). Images are ``[1, image_size,
    image_size]`` with ink 1 on a 0 background.

    Difficulty (per-image variation) options:
      ``strokes``: (min, max) strokes per prototype.
      ``rotation``: max rotation in degrees (uniform in ``tan(angle/2)``, nearly uniform in angle).
      ``scale``: (min, max) isotropic scale; ``aspect``: max relative aspect change.
      ``shear``: max horizontal shear; ``translation``: max shift in glyph units (1 unit ~ 12 px
      at 28x28; the prototype fits in [-0.8, 0.8]).
      ``point_noise``: std of the noise on every Bezier control point (glyph units).
      ``stroke_shift``: std of the shift of each whole stroke (glyph units).
      ``stroke_width``: (min, max) pen width in pixels at 28x28 (scaled with ``image_size``).
      ``width_jitter``: relative variation of the pen width from stroke to stroke.
    """

    def __init__(
        self,
        num_classes: int,
        images_per_class: int = 20,
        image_size: int = 28,
        seed: int = 0,
        *,
        class_offset: int = 0,
        strokes: tuple[int, int] = (2, 4),
        rotation: float = 12.0,
        scale: tuple[float, float] = (0.85, 1.1),
        aspect: float = 0.1,
        shear: float = 0.15,
        translation: float = 0.12,
        point_noise: float = 0.06,
        stroke_shift: float = 0.05,
        stroke_width: tuple[float, float] = (1.1, 2.0),
        width_jitter: float = 0.1,
        transform: ImageTransform | None = None,
    ) -> None:
        for name, value, low in (
            ("num_classes", num_classes, 1),
            ("images_per_class", images_per_class, 1),
            ("image_size", image_size, 8),
            ("seed", seed, 0),
            ("class_offset", class_offset, 0),
        ):
            if int(value) != value or value < low:
                raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")
        lo_s, hi_s = (int(s) for s in strokes)
        if not 1 <= lo_s <= hi_s <= 8:
            raise ValueError(f"strokes must be (min, max) with 1 <= min <= max <= 8; got {strokes}")
        self.num_prototypes = int(num_classes)
        self.images_per_class = int(images_per_class)
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.class_offset = int(class_offset)
        self.options: _GlyphOptions = {
            "strokes": (lo_s, hi_s),
            "rotation": _check_nonneg("rotation", rotation, 90.0),
            "scale": _check_range("scale", scale, 0.1, 3.0),
            "aspect": _check_nonneg("aspect", aspect, 0.9),
            "shear": _check_nonneg("shear", shear, 1.0),
            "translation": _check_nonneg("translation", translation, 1.0),
            "point_noise": _check_nonneg("point_noise", point_noise, 1.0),
            "stroke_shift": _check_nonneg("stroke_shift", stroke_shift, 1.0),
            "stroke_width": _check_range("stroke_width", stroke_width, 0.1, 10.0),
            "width_jitter": _check_nonneg("width_jitter", width_jitter, 0.9),
        }
        data = np.empty((num_classes * images_per_class, 1, image_size, image_size), np.uint8)
        for c in range(num_classes):
            rows = slice(c * images_per_class, (c + 1) * images_per_class)
            data[rows, 0] = self.render_class(self.class_offset + c, images_per_class)
        ipc = self.images_per_class
        super().__init__(
            torch.from_numpy(data),
            [np.arange(c * ipc, (c + 1) * ipc) for c in range(num_classes)],
            names=[f"glyph{self.class_offset + c}" for c in range(num_classes)],
            transform=transform,
        )

    def prototype(self, class_id: int) -> _Prototype:
        """The prototype of global class id ``class_id`` (a pure function of seed and id)."""
        rng = np.random.default_rng([self.seed, _PROTOTYPE, int(class_id)])
        return _make_prototype(rng, self.options["strokes"], _PX_PER_UNIT * self.image_size)

    def render_class(self, class_id: int, count: int) -> np.ndarray:
        """Images ``0..count-1`` of global class id ``class_id`` as uint8 ``[count, S, S]``."""
        o = self.options
        proto = self.prototype(class_id)
        n_ctrl, n_str = len(proto.controls), proto.num_strokes
        # Two streams per class, each consumed row by row (one row per image): image i reads
        # rows i of both, so it depends on (seed, class, i) only.
        normal = np.random.default_rng([self.seed, _NOISE, int(class_id)]).standard_normal(
            (count, n_ctrl + n_str, 2)
        )
        uni = np.random.default_rng([self.seed, _UNIFORM, int(class_id)]).random((count, 7 + n_str))
        uni = uni * 2.0 - 1.0  # U[-1, 1]
        ctrl = proto.controls[None] + o["point_noise"] * normal[:, :n_ctrl]
        ctrl = ctrl + o["stroke_shift"] * normal[:, n_ctrl:][:, proto.stroke_of_ctrl]
        pts = proto.sample(ctrl)
        # Affine map: scale and aspect, then shear, then rotation, then translation. The rotation
        # uses the rational parametrisation cos = (1-t^2)/(1+t^2), sin = 2t/(1+t^2) of
        # t = tan(angle/2): no transcendental function per image.
        col = lambda k: uni[:, k, None]  # noqa: E731
        s_lo, s_hi = o["scale"]
        s = (s_lo + s_hi) / 2.0 + (s_hi - s_lo) / 2.0 * col(0)
        sx, sy = s * (1.0 + o["aspect"] * col(1)), s / (1.0 + o["aspect"] * col(1))
        x, y = sx * pts[..., 0], sy * pts[..., 1]
        x = x + o["shear"] * col(2) * y
        t = _snap(math.tan(math.radians(o["rotation"]) / 2.0)) * col(3)
        cos, sin = (1.0 - t * t) / (1.0 + t * t), 2.0 * t / (1.0 + t * t)
        x, y = cos * x - sin * y, sin * x + cos * y
        x, y = x + o["translation"] * col(4), y + o["translation"] * col(5)
        size = self.image_size
        px = _PX_PER_UNIT * size
        centre = (size - 1) / 2.0
        points = np.stack([centre + px * x, centre + px * y], axis=-1)
        # Pen width: one per image, times 1 +- width_jitter per stroke.
        w_lo, w_hi = o["stroke_width"]
        width = (w_lo + w_hi) / 2.0 + (w_hi - w_lo) / 2.0 * col(6)
        width = width * (1.0 + o["width_jitter"] * uni[:, 7:]) * (size / 28.0)  # [count, n_str]
        half = width[:, proto.stroke_of_segment] / 2.0
        # Chunks of images bound the memory of the [images, segments, W, W] temporaries (large
        # images and many images per class); the result does not depend on the chunking.
        cells = half.shape[1] * (2 * math.ceil(3.0 + half.max()) + 2) ** 2
        chunk = max(1, _CHUNK_CELLS // cells)
        return np.concatenate(
            [
                _rasterise(points[i : i + chunk], proto.segment_ok, half[i : i + chunk], size)
                for i in range(0, count, chunk)
            ]
        )


def glyph_splits(
    root: str | None = None,
    num_train: int = 600,
    num_validation: int = 100,
    num_test: int = 200,
    images_per_class: int = 20,
    image_size: int = 28,
    seed: int = 0,
    **options,
) -> dict[str, ClassDataset]:
    """Train/validation/test :class:`GlyphClasses` with disjoint class prototypes.

    ``root`` is ignored (nothing is read from disk). The splits draw their prototypes from
    disjoint id ranges (:data:`SPLIT_OFFSETS`), so the test classes stay the same whatever
    ``num_train`` is. ``options`` are GlyphClasses' difficulty options.
    """
    allowed = {
        n
        for n, p in inspect.signature(GlyphClasses.__init__).parameters.items()
        if p.kind is p.KEYWORD_ONLY and n != "class_offset"
    }
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise TypeError(
            f"unknown glyph option(s) {unknown}; glyph_splits accepts num_train, num_validation, "
            f"num_test, images_per_class, image_size, seed and {sorted(allowed)}"
        )
    sizes = {"train": num_train, "validation": num_validation, "test": num_test}
    return {
        split: GlyphClasses(
            n, images_per_class, image_size, seed, class_offset=SPLIT_OFFSETS[split], **options
        )
        for split, n in sizes.items()
    }


def save_grid(
    dataset: ClassDataset,
    path: str | Path,
    classes: Sequence[int] | None = None,
    per_class: int = 10,
    scale: int = 2,
) -> Path:
    """Save a PNG with one row per class (``per_class`` images each), ink drawn black on white."""
    from PIL import Image

    classes = list(range(min(10, dataset.num_classes))) if classes is None else list(classes)
    rows = []
    for c in classes:
        x = dataset.images(c, np.arange(min(per_class, dataset.num_images(c))))
        x = x[:, 0] if x.dim() == 4 else x
        rows.append(
            torch.cat([torch.nn.functional.pad(im, (1, 1, 1, 1), value=0.3) for im in x], 1)
        )
    width = max(r.shape[1] for r in rows)
    grid = torch.cat([torch.nn.functional.pad(r, (0, width - r.shape[1])) for r in rows], 0)
    pixels = ((1.0 - grid.clamp(0, 1)) * 255).round().to(torch.uint8).numpy()
    img = Image.fromarray(pixels, mode="L")
    img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    path = Path(path)
    img.save(path)
    return path
