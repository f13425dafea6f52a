import hashlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from tasks import TaskSampler, TensorClassDataset, get_tasksets, glyphs
from tasks.glyphs import SPLIT_OFFSETS, GlyphClasses, glyph_splits, save_grid

# sha256 of GlyphClasses(4, 5, seed=0).data: pins the exact bytes, so a change of the generator
# (or a platform whose arithmetic differs) is noticed. Update only on purpose, and say so.
GOLDEN_SHA256 = "0e58c10dfd741f90f6cf65e1b7679132ff7d609f9d4cb3c5ce408906b925be14"


@pytest.fixture(scope="module")
def small() -> GlyphClasses:
    return GlyphClasses(6, images_per_class=8, seed=0)


def test_shapes_dtype_and_range(small):
    assert isinstance(small, TensorClassDataset)
    assert small.num_classes == 6 and small.num_images(5) == 8
    assert small.data.dtype == torch.uint8 and small.data.shape == (48, 1, 28, 28)
    x = small.images(2, [0, 3])
    assert x.dtype == torch.float32 and x.shape == (2, 1, 28, 28)
    assert x.min() >= 0 and x.max() <= 1
    ink = small.data.float().div(255).flatten(1)
    # Every image has solid strokes on a mostly empty background, like Omniglot at 28x28.
    assert (ink.amax(1) == 1).all()
    assert ((ink > 0.5).float().mean(1) > 0.02).all()
    assert ((ink == 0).float().mean(1) > 0.6).all()
    assert small.class_name(3) == "glyph3"


def test_instances_vary_but_keep_class_identity(small):
    x = small.data.float().div(255).flatten(1).view(6, 8, -1)
    # No two images are identical (per-instance jitter), within or across classes.
    flat = x.reshape(48, -1)
    d = torch.cdist(flat, flat)
    assert (d + torch.eye(48) * 1e9).min() > 0.5
    # Class identity: the mean image of a class is closer to its own held-out images than to
    # the other classes' (a weak check; the learnability test is the strong one).
    means = x[:, :4].mean(1)
    dist = torch.cdist(x[:, 4:].reshape(24, -1), means)
    assert (dist.argmin(1) == torch.arange(6).repeat_interleave(4)).float().mean() > 0.6


def test_same_seed_same_bytes_and_pure_function_of_ids():
    a = GlyphClasses(4, 5, seed=0)
    assert torch.equal(a.data, GlyphClasses(4, 5, seed=0).data)
    assert hashlib.sha256(a.data.numpy().tobytes()).hexdigest() == GOLDEN_SHA256
    # A different seed gives different glyphs.
    assert not torch.equal(a.data, GlyphClasses(4, 5, seed=1).data)
    # Image i of class c depends on (seed, c, i) only: more images per class extend the set,
    # and class_offset shifts the window of prototype ids.
    more = GlyphClasses(5, 7, seed=0)
    for c in range(4):
        assert torch.equal(more.data[c * 7 : c * 7 + 5], a.data[c * 5 : (c + 1) * 5])
    shifted = GlyphClasses(2, 5, seed=0, class_offset=2)
    assert torch.equal(shifted.data, a.data[10:20])
    assert shifted.class_name(0) == "glyph2"


def test_other_image_sizes_scale_the_drawing():
    small = GlyphClasses(2, 3, image_size=28, seed=4)
    big = GlyphClasses(2, 3, image_size=56, seed=4)
    assert big.data.shape == (6, 1, 56, 56)
    # The same glyphs at twice the resolution: downsampled, they match the 28x28 render.
    down = F.avg_pool2d(big.data.float() / 255, 2)
    err = (down - small.data.float() / 255).abs().mean() / (small.data.float() / 255).mean()
    assert err < 0.5
    other = GlyphClasses(2, 3, image_size=28, seed=5)
    err_other = (down - other.data.float() / 255).abs().mean() / (other.data.float() / 255).mean()
    assert err < err_other


def test_rasteriser_matches_brute_force_distance():
    # Independent reference: distance of every pixel centre to every segment, in float64.
    rng = np.random.default_rng(0)
    size = 20
    pts = np.cumsum(rng.normal(0, 1.2, size=(3, 12, 2)), axis=1) + 10.0
    ok = np.ones(11, dtype=bool)
    ok[5] = False  # two strokes: points 0-5 and 6-11
    half = rng.uniform(0.4, 1.2, size=(3, 10))
    got = glyphs._rasterise(pts, ok, half, size).astype(np.float64) / 255
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    pix = np.stack([xx.ravel(), yy.ravel()], 1)  # (x = column, y = row)
    for i in range(3):
        a, b = pts[i, :-1][ok], pts[i, 1:][ok]
        ink = np.zeros(size * size)
        for k in range(len(a)):
            u = b[k] - a[k]
            t = np.clip(((pix - a[k]) @ u) / (u @ u), 0, 1)
            d = np.linalg.norm(pix - a[k] - t[:, None] * u, axis=1)
            ink = np.maximum(ink, np.clip(half[i, k] + 0.5 - d, 0, 1))
        np.testing.assert_allclose(got[i].ravel(), ink, atol=1 / 255 + 1e-6)
    # A horizontal bar of half width 1 through pixel centres: ink 1 + 1/2 - distance.
    bar = glyphs._rasterise(
        np.array([[[4.0, 10.0], [15.0, 10.0]]]), np.array([True]), np.ones((1, 1)), size
    )[0]
    assert (bar[10, 4:16] == 255).all()
    assert (bar[9, 4:16] == 128).all() and (bar[11, 4:16] == 128).all()  # distance 1: ink 0.5
    assert (bar[8] == 0).all() and (bar[12] == 0).all()
    assert bar[10, 3] == 128 and bar[10, 16] == 128 and bar[10, 2] == 0  # round pen ends


def test_chunked_rendering_gives_the_same_bytes(monkeypatch):
    whole = GlyphClasses(2, 7, image_size=40, seed=3)
    monkeypatch.setattr(glyphs, "_CHUNK_CELLS", 1)  # one image per chunk
    torch.testing.assert_close(GlyphClasses(2, 7, image_size=40, seed=3).data, whole.data)


def test_difficulty_options_change_the_variation():
    still = GlyphClasses(
        2,
        6,
        seed=0,
        rotation=0,
        scale=(1, 1),
        aspect=0,
        shear=0,
        translation=0,
        point_noise=0,
        stroke_shift=0,
        stroke_width=(1.5, 1.5),
        width_jitter=0,
    )
    # With no jitter every instance of a class is the same picture.
    x = still.data.view(2, 6, -1)
    assert (x == x[:, :1]).all()
    jittered = GlyphClasses(2, 6, seed=0).data.view(2, 6, -1)
    assert not (jittered == jittered[:, :1]).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_classes": 0}, "num_classes"),
        ({"num_classes": 2, "image_size": 4}, "image_size"),
        ({"num_classes": 2, "seed": -1}, "seed"),
        ({"num_classes": 2, "scale": (1.2, 0.8)}, "scale"),
        ({"num_classes": 2, "strokes": (3, 2)}, "strokes"),
        ({"num_classes": 2, "rotation": -5}, "rotation"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GlyphClasses(**kwargs)


def test_splits_are_disjoint_and_stable():
    sp = glyph_splits(num_train=8, num_validation=4, num_test=4, images_per_class=3, seed=0)
    assert set(sp) == {"train", "validation", "test"}
    names = {k: {d.class_name(c) for c in range(d.num_classes)} for k, d in sp.items()}
    assert len(names["train"] | names["validation"] | names["test"]) == 16
    # No image of one split equals an image of another.
    flat = {k: d.data.flatten(1).float() for k, d in sp.items()}
    for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
        assert torch.cdist(flat[a], flat[b]).min() > 0
    # Test classes do not depend on the number of training classes.
    sp2 = glyph_splits(num_train=3, num_validation=2, num_test=4, images_per_class=3, seed=0)
    assert torch.equal(sp2["test"].data, sp["test"].data)
    assert sp["test"].class_offset == SPLIT_OFFSETS["test"]
    with pytest.raises(TypeError, match="download"):
        glyph_splits(download=True)


def test_get_tasksets_and_task_sampler():
    ts = get_tasksets(
        "glyphs",
        None,
        ways=5,
        shots=2,
        queries=3,
        num_train=10,
        num_validation=6,
        num_test=6,
        images_per_class=6,
        rotation=10.0,
    )
    e = ts.train.sample(0)
    assert e.support_x.shape == (10, 1, 28, 28) and e.query_x.shape == (15, 1, 28, 28)
    assert e.support_y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    torch.testing.assert_close(ts.train.sample(0).query_x, e.query_x, rtol=0, atol=0)
    assert ts.test.sample(0).classes.max() < 6
    b = ts.validation.sample_batch(2)
    assert b.query_x.shape == (2, 15, 1, 28, 28)
    sampler = TaskSampler(GlyphClasses(6, 4, seed=2), ways=3, shots=1, queries=3, seed=0)
    assert sampler.sample().support_x.shape == (3, 1, 28, 28)


def test_save_grid(tmp_path, small):
    path = save_grid(small, tmp_path / "grid.png", classes=[0, 1, 2], per_class=4, scale=2)
    img = Image.open(path)
    assert img.size == (4 * 30 * 2, 3 * 30 * 2)
    pixels = np.asarray(img)
    assert pixels.min() == 0 and pixels.max() == 255  # black ink on white


def _conv4(width: int) -> nn.Sequential:
    def block(i: int, o: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2)
        )

    return nn.Sequential(block(1, width), *[block(width, width) for _ in range(3)], nn.Flatten())


def _nearest_centroid_accuracy(
    features: torch.Tensor, ways: int, shots: int, episodes: int, queries: int = 15
) -> float:
    """Mean accuracy of nearest-class-mean over random episodes; features [classes, images, D]."""
    rng = np.random.default_rng(0)
    n_cls, n_img = features.shape[:2]
    correct = []
    for _ in range(episodes):
        cls = rng.choice(n_cls, ways, replace=False)
        idx = np.stack([rng.choice(n_img, shots + queries, replace=False) for _ in cls])
        f = features[torch.as_tensor(cls)[:, None], torch.as_tensor(idx)]
        protos = f[:, :shots].mean(1)
        pred = torch.cdist(f[:, shots:].reshape(-1, f.shape[-1]), protos).argmin(1)
        correct.append((pred == torch.arange(ways).repeat_interleave(queries)).float().mean())
    return float(torch.stack(correct).mean())


def test_learnable_but_not_trivial():
    """A small 4-conv net trained on train classes transfers to held-out glyph classes.

    Measured with this recipe (200 steps; 5-way 1-shot nearest-centroid over 200 episodes;
    glyph seeds 0 and 1): learned features 0.879 / 0.881, raw pixels 0.666 / 0.684, mean
    intensity alone 0.317 / 0.356 (chance 0.20). At 5 shots: 0.957 / 0.956 vs pixels 0.925.
    """
    threads = torch.get_num_threads()
    # One thread: on a busy 2-core machine, two threads make these small convs ~4x slower.
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        sp = glyph_splits(num_train=100, num_validation=1, num_test=50, seed=0)
        train, test = sp["train"], sp["test"]
        x = train.data.float() / 255
        y = torch.arange(train.num_classes).repeat_interleave(train.images_per_class)
        features = _conv4(16)
        head = nn.Linear(16, train.num_classes)
        params = list(features.parameters()) + list(head.parameters())
        opt = torch.optim.Adam(params, 3e-3)
        gen = torch.Generator().manual_seed(0)
        for _ in range(200):
            idx = torch.randint(len(x), (32,), generator=gen)
            loss = F.cross_entropy(head(features(x[idx])), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        features.eval()
        xt = test.data.float() / 255
        with torch.no_grad():
            learned = features(xt).view(test.num_classes, test.images_per_class, -1)
        pixels = xt.flatten(1).view(test.num_classes, test.images_per_class, -1)
        mean_ink = pixels.mean(-1, keepdim=True)
        acc = {
            name: _nearest_centroid_accuracy(f, ways=5, shots=1, episodes=200)
            for name, f in (("learned", learned), ("pixels", pixels), ("mean", mean_ink))
        }
    finally:
        torch.set_num_threads(threads)
    assert acc["learned"] > 0.7, acc
    assert acc["learned"] > acc["pixels"] + 0.1, acc
    assert acc["pixels"] < 0.85, acc  # raw pixel matching does not solve it
    assert acc["mean"] < 0.5, acc  # nor does the amount of ink
