"""tasks.omniglot on the real minimal splits (the zips bundled in tasks/data/omniglot/) and on
generated fixtures."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tasks
from tasks import EpisodeSpecError, RotatedClasses, TaskSampler
from tasks.download import check_md5
from tasks.errors import CorruptDatasetError, DatasetNotFoundError
from tasks.omniglot import (
    OMNIGLOT_MD5,
    Omniglot,
    omniglot_minimal_splits,
    omniglot_splits,
    split_url,
)

SMALL = ("background_small1", "background_small2")


@pytest.fixture(scope="session")
def small1(omniglot_root: Path) -> Omniglot:
    return Omniglot(omniglot_root, "background_small1", verify=True)


@pytest.fixture(scope="session")
def small2(omniglot_root: Path) -> Omniglot:
    return Omniglot(omniglot_root, "background_small2")


@pytest.fixture(scope="session")
def minimal(omniglot_root: Path, small1: Omniglot, small2: Omniglot) -> dict:
    return omniglot_minimal_splits(omniglot_root)


def _png(seed: int, size: int = 105) -> bytes:
    """A 1-bit drawing like Omniglot's: white background, a few black strokes."""
    rng = np.random.default_rng(seed)
    a = np.ones((size, size), dtype=bool)
    for _ in range(3):
        r, c = rng.integers(10, size - 30, size=2)
        a[r : r + 20, c : c + 4] = False
    buf = io.BytesIO()
    Image.fromarray(a).convert("1").save(buf, format="PNG")
    return buf.getvalue()


def _write_split(folder: Path, chars: dict[str, int], images: int = 2, seed: int = 0) -> None:
    """An Omniglot split folder: chars maps "Alphabet" -> number of characters."""
    k = seed
    for alpha, n in chars.items():
        for j in range(1, n + 1):
            d = folder / alpha / f"character{j:02d}"
            d.mkdir(parents=True)
            for i in range(1, images + 1):
                k += 1
                (d / f"{k:04d}_{i:02d}.png").write_bytes(_png(k))


# --- the real minimal splits ------------------------------------------------------------------


def test_shared_zips_match_official_md5(omniglot_root: Path) -> None:
    for split in SMALL:
        check_md5(omniglot_root / f"images_{split}.zip", OMNIGLOT_MD5[split])


@pytest.mark.parametrize(
    ("name", "classes", "alphabets"),
    [
        ("small1", 136, ["Balinese", "Early_Aramaic", "Greek", "Korean", "Latin"]),
        ("small2", 156, ["Greek", "Japanese_(katakana)", "Latin", "Sanskrit", "Tagalog"]),
    ],
)
def test_class_counts_and_images(
    request: pytest.FixtureRequest, name: str, classes: int, alphabets: list[str]
) -> None:
    ds: Omniglot = request.getfixturevalue(name)
    assert ds.num_classes == classes
    assert ds.alphabets == alphabets
    assert (ds.class_sizes() == 20).all()
    assert ds.data.dtype == torch.uint8 and ds.data.shape == (classes * 20, 1, 28, 28)
    x = ds.class_images(3)
    assert x.shape == (20, 1, 28, 28) and x.dtype == torch.float32
    assert x.min() >= 0 and x.max() <= 1 and x.max() > 0.9
    # Ink = 1: strokes cover a small part of the page, background (e.g. the border) is 0.
    all_x = ds.data.float() / 255
    assert all_x.mean() < 0.2
    assert all_x[:, :, 0, :].mean() < 0.01
    # Deterministic order: sorted by (alphabet, character), names "Alphabet/characterNN".
    names = [ds.class_name(c) for c in range(classes)]
    assert names == sorted(names)
    assert all(n.split("/")[1].startswith("character") for n in names)
    assert [ds.alphabet(c) for c in range(classes)] == [n.split("/")[0] for n in names]
    assert np.all(np.diff(ds.class_alphabet) >= 0)
    assert set(ds.class_alphabet.tolist()) == set(range(len(alphabets)))
    assert ds.files[0].startswith(names[0] + "/")


def test_ink_is_inverted_pixels(omniglot_root: Path, small1: Omniglot) -> None:
    """At full size, stored pixels are exactly 'not white' of the raw 1-bit PNGs."""
    full = Omniglot(omniglot_root, "background_small1", image_size=105)
    with zipfile.ZipFile(omniglot_root / "images_background_small1.zip") as zf:
        for row in (0, 1234, len(full.files) - 1):
            raw = np.asarray(
                Image.open(io.BytesIO(zf.read(f"images_background_small1/{full.files[row]}")))
            )
            assert raw.dtype == bool and raw.shape == (105, 105)
            np.testing.assert_array_equal(full.data[row, 0].numpy(), (~raw) * 255)
    # Resampling to 28x28 keeps the ink mass per image (a low-pass filter preserves the mean).
    mean105 = full.data.float().mean(dim=(1, 2, 3))
    mean28 = small1.data.float().mean(dim=(1, 2, 3))
    assert torch.allclose(mean28, mean105, rtol=0.1, atol=1.0)
    assert full.files == small1.files


def test_folder_and_torchvision_layouts_match_zip(
    omniglot_root: Path, small1: Omniglot, tmp_path: Path
) -> None:
    with zipfile.ZipFile(omniglot_root / "images_background_small1.zip") as zf:
        members = [n for n in zf.namelist() if "/Greek/" in n]  # one alphabet is enough
        zf.extractall(tmp_path / "extracted", members)
    folder = Omniglot(tmp_path / "extracted", "background_small1")
    greek = [c for c in range(small1.num_classes) if small1.alphabet(c) == "Greek"]
    assert folder.num_classes == len(greek) == 24
    assert [folder.class_name(c) for c in range(24)] == [small1.class_name(c) for c in greek]
    for j, c in enumerate(greek):
        assert torch.equal(folder.class_images(j), small1.class_images(c))
    # torchvision layout: ROOT/omniglot-py/images_<split>.zip (a link, not a copy of the data).
    (tmp_path / "tv" / "omniglot-py").mkdir(parents=True)
    link = tmp_path / "tv" / "omniglot-py" / "images_background_small1.zip"
    link.symlink_to(omniglot_root / "images_background_small1.zip")
    tv = Omniglot(tmp_path / "tv", "background_small1")
    assert tv.source == link and torch.equal(tv.data, small1.data)


def test_sampling_is_deterministic_per_seed(small1: Omniglot) -> None:
    a = TaskSampler(small1, ways=5, shots=1, queries=5, seed=7)
    b = TaskSampler(small1, ways=5, shots=1, queries=5, seed=7)
    c = TaskSampler(small1, ways=5, shots=1, queries=5, seed=8)
    for i in range(3):
        ea, eb, ec = a.sample(), b.sample(), c.sample(i)
        for f in ("support_x", "support_y", "query_x", "query_y", "classes"):
            assert torch.equal(getattr(ea, f), getattr(eb, f))
        assert not torch.equal(ea.classes, ec.classes) or not torch.equal(ea.query_x, ec.query_x)


def test_labels_are_remapped_consistently(small1: Omniglot) -> None:
    sampler = TaskSampler(small1, ways=5, shots=2, queries=3, seed=0)
    for _ in range(3):
        ep = sampler.sample()
        assert ep.support_y.tolist() == [k for k in range(5) for _ in range(2)]
        assert ep.query_y.tolist() == [k for k in range(5) for _ in range(3)]
        assert len(set(ep.classes.tolist())) == 5
        # Every image carries the label of the class it was drawn from.
        for x, y in [*zip(ep.support_x, ep.support_y), *zip(ep.query_x, ep.query_y)]:
            pool = small1.class_images(int(ep.classes[y]))
            assert any(torch.equal(x, p) for p in pool)


def test_rotated_classes_are_rot90_of_base(small1: Omniglot) -> None:
    rot = RotatedClasses(small1)
    assert rot.num_classes == 4 * 136
    idx = [0, 5, 19]
    for c in (0, 77):
        base = small1.images(c, idx)
        for r in range(4):
            expected = torch.rot90(base, r, dims=(-2, -1))
            assert torch.equal(rot.images(4 * c + r, idx), expected)
        assert not torch.equal(rot.images(4 * c + 1, idx), base)
        assert rot.class_name(4 * c + 2) == f"{small1.class_name(c)}@rot180"


def _base_names(ds) -> set[str]:
    return {ds.class_name(c).split("@")[0] for c in range(ds.num_classes)}


def test_minimal_split_classes(minimal: dict, small1: Omniglot, small2: Omniglot) -> None:
    train, val, test = minimal["train"], minimal["validation"], minimal["test"]
    assert (train.num_classes, val.num_classes, test.num_classes) == (109 * 4, 27, 106)
    tr, va, te = _base_names(train), _base_names(val), _base_names(test)
    assert len(tr) == 109 and not tr & va
    assert tr | va == {small1.class_name(c) for c in range(136)}
    assert not te & (tr | va)
    assert {n.split("/")[0] for n in te} == {"Japanese_(katakana)", "Sanskrit", "Tagalog"}
    # Greek and Latin are in both small splits with identical drawings: the same pixels under
    # the same names, so leaving them out of test by name also leaves out every shared image.
    d1 = {small1.class_name(c): small1.class_digest(c) for c in range(136)}
    d2 = {small2.class_name(c): small2.class_digest(c) for c in range(156)}
    shared = set(d1) & set(d2)
    assert len(shared) == 50 and all(d1[n] == d2[n] for n in shared)
    test_digests = {test.dataset.class_digest(int(c)) for c in test.classes}
    assert not test_digests & set(d1.values())


def test_minimal_split_seed_and_reverse(omniglot_root: Path, minimal: dict) -> None:
    again = omniglot_minimal_splits(omniglot_root)
    assert _base_names(again["validation"]) == _base_names(minimal["validation"])
    other = omniglot_minimal_splits(omniglot_root, seed=1, rotations=False)
    assert _base_names(other["validation"]) != _base_names(minimal["validation"])
    assert other["train"].num_classes == 109
    rev = omniglot_minimal_splits(omniglot_root, train="background_small2", rotations=False)
    assert (rev["train"].num_classes, rev["validation"].num_classes) == (125, 31)
    assert {n.split("/")[0] for n in _base_names(rev["test"])} == {
        "Balinese",
        "Early_Aramaic",
        "Korean",
    }
    assert rev["test"].num_classes == 86
    with pytest.raises(ValueError, match="validation_fraction"):
        omniglot_minimal_splits(omniglot_root, validation_fraction=1.0)
    with pytest.raises(ValueError, match="background_small1"):
        omniglot_minimal_splits(omniglot_root, train="background")


def test_get_tasksets_end_to_end(omniglot_root: Path, minimal: dict) -> None:
    ts = tasks.get_tasksets("omniglot-minimal", str(omniglot_root), ways=5, shots=1, queries=5)
    for sampler, n_classes in zip(ts, (436, 27, 106)):
        assert sampler.dataset.num_classes == n_classes
        batch = sampler.sample_batch(2)
        assert batch.support_x.shape == (2, 5, 1, 28, 28)
        assert batch.query_x.shape == (2, 25, 1, 28, 28)
        assert batch.query_y.shape == (2, 25) and int(batch.query_y.max()) == 4


def test_too_many_ways_is_an_episode_spec_error(minimal: dict) -> None:
    with pytest.raises(EpisodeSpecError, match="27"):
        TaskSampler(minimal["validation"], ways=28, shots=1, queries=1)
    with pytest.raises(EpisodeSpecError, match="20"):
        TaskSampler(minimal["test"], ways=5, shots=15, queries=10)


# --- errors ----------------------------------------------------------------------------------


def test_missing_root_says_where_and_how_to_download(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as e:
        Omniglot(tmp_path / "nowhere", "background_small1")
    msg = str(e.value)
    assert "download=True" in msg and split_url("background_small1") in msg
    assert "images_background_small1.zip" in msg and "omniglot-py" in msg
    with pytest.raises(DatasetNotFoundError, match="root"):
        Omniglot(None, "background")
    with pytest.raises(ValueError, match="background_small1"):
        Omniglot(tmp_path, "small1")


def test_truncated_zip_is_corrupt(omniglot_root: Path, tmp_path: Path) -> None:
    data = (omniglot_root / "images_background_small1.zip").read_bytes()
    bad = tmp_path / "images_background_small1.zip"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptDatasetError) as e:
        Omniglot(tmp_path, "background_small1")
    assert str(bad) in str(e.value) and "download" in str(e.value)
    with pytest.raises(CorruptDatasetError, match=OMNIGLOT_MD5["background_small1"]):
        Omniglot(tmp_path, "background_small1", verify=True)


def test_damaged_member_and_bad_image_are_corrupt(tmp_path: Path) -> None:
    # A member whose stored bytes were altered: the zip's CRC check fails on read.
    good = tmp_path / "a" / "images_background_small2.zip"
    good.parent.mkdir()
    with zipfile.ZipFile(good, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("images_background_small2/Greek/character01/0001_01.png", _png(1))
        zf.writestr("images_background_small2/Greek/character01/0001_02.png", _png(2))
    assert Omniglot(good.parent, "background_small2").num_classes == 1
    raw = bytearray(good.read_bytes())
    raw[raw.index(b"IDAT") + 8] ^= 0xFF
    good.write_bytes(bytes(raw))
    with pytest.raises(CorruptDatasetError, match="0001_0"):
        Omniglot(good.parent, "background_small2")
    # Bytes that are not an image at all.
    junk = tmp_path / "b" / "images_background_small2"
    (junk / "Greek" / "character01").mkdir(parents=True)
    (junk / "Greek" / "character01" / "x.png").write_bytes(b"not a png")
    with pytest.raises(CorruptDatasetError, match="x.png"):
        Omniglot(tmp_path / "b", "background_small2")


def test_empty_character_folder_is_corrupt(tmp_path: Path) -> None:
    folder = tmp_path / "images_background_small1"
    _write_split(folder, {"Alpha": 2})
    (folder / "Alpha" / "character03").mkdir()
    with pytest.raises(CorruptDatasetError, match="character03"):
        Omniglot(tmp_path, "background_small1")
    # The same in a zip that lists the empty folder.
    z = tmp_path / "z" / "images_background_small1.zip"
    z.parent.mkdir()
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("images_background_small1/Alpha/character01/0001_01.png", _png(1))
        zf.writestr("images_background_small1/Alpha/character02/", b"")
    with pytest.raises(CorruptDatasetError, match="character02"):
        Omniglot(z.parent, "background_small1")


def test_download_fetches_missing_zip_with_md5(
    omniglot_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def fake_download(url: str, dest: Path, md5: str) -> Path:
        calls.append((url, Path(dest), md5))
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        Path(dest).symlink_to(omniglot_root / Path(dest).name)
        return Path(dest)

    monkeypatch.setattr("tasks.omniglot.download_url", fake_download)
    ds = Omniglot(tmp_path / "new", "background_small2", download=True)
    assert ds.num_classes == 156
    assert calls == [
        (
            split_url("background_small2"),
            tmp_path / "new" / "images_background_small2.zip",
            OMNIGLOT_MD5["background_small2"],
        )
    ]
    assert split_url("background_small2") == (
        "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/"
        "images_background_small2.zip"
    )
    Omniglot(tmp_path / "new", "background_small2", download=True)  # present: no new download
    assert len(calls) == 1


# --- the full benchmark split, on a generated miniature ------------------------------------


@pytest.fixture(scope="module")
def fake_full(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("omniglot_full")
    _write_split(root / "images_background", {"Alpha": 5, "Beta": 4}, seed=0)
    _write_split(root / "images_evaluation", {"Gamma": 3, "Delta": 2}, seed=1000)
    return root


def test_full_split_partitions_all_characters(fake_full: Path) -> None:
    s = omniglot_splits(fake_full, num_train=8, num_validation=2)
    tr, va, te = (_base_names(s[k]) for k in ("train", "validation", "test"))
    assert (len(tr), len(va), len(te)) == (8, 2, 4)
    assert s["train"].num_classes == 32  # rotations x4 on meta-train only
    assert (s["validation"].num_classes, s["test"].num_classes) == (2, 4)
    assert not (tr & va or tr & te or va & te)
    assert len(tr | va | te) == 14
    again = omniglot_splits(fake_full, num_train=8, num_validation=2)
    assert _base_names(again["test"]) == te
    other = [
        _base_names(omniglot_splits(fake_full, seed=s_, num_train=8, num_validation=2)["test"])
        for s_ in (1, 2)
    ]
    assert any(o != te for o in other)
    rot = omniglot_splits(fake_full, num_train=8, num_validation=2, rotate_evaluation=True)
    assert rot["test"].num_classes == 16
    plain = omniglot_splits(fake_full, num_train=8, num_validation=2, rotations=False)
    assert plain["train"].num_classes == 8
    with pytest.raises(ValueError, match="num_train"):
        omniglot_splits(fake_full)  # 1100 + 100 characters needed, 14 present


# --- within-alphabet episodes (Lake et al. 2015) ------------------------------------------------


def _alphabet_of(sampler: TaskSampler, c: int) -> str:
    # Read from the class *name* ("Alphabet/characterNN[@rotR]"), independently of
    # class_alphabets(), which the sampler itself uses.
    return sampler.dataset.class_name(int(c)).split("/")[0]


def test_within_alphabet_test_episodes_on_real_minimal(omniglot_root: Path, minimal: dict) -> None:
    # 20-way within-alphabet test episodes: of the small2 test alphabets, Japanese (47 characters)
    # and Sanskrit (42) have 20 characters, Tagalog (17) has not and is skipped.
    ts = tasks.get_tasksets(
        "omniglot-minimal", str(omniglot_root), ways=20, queries=1, within_alphabet="test"
    )
    test = ts.test
    assert test.alphabets == ["Japanese_(katakana)", "Sanskrit"]
    assert not ts.train.within_alphabet and not ts.validation.within_alphabet
    seen = []
    for i in range(40):
        ep = test.sample(i)
        alphas = {_alphabet_of(test, c) for c in ep.classes}
        assert len(alphas) == 1 and len(set(ep.classes.tolist())) == 20
        seen.append(alphas.pop())
    assert set(seen) == {"Japanese_(katakana)", "Sanskrit"}
    # A pure function of (seed, index): the same episode from a fresh sampler, out of order.
    again = tasks.get_tasksets(
        "omniglot-minimal", str(omniglot_root), ways=20, queries=1, within_alphabet="test"
    ).test
    for i in (17, 3, 0):
        a, b = test.sample(i), again.sample(i)
        assert torch.equal(a.classes, b.classes) and torch.equal(a.query_x, b.query_x)
    # The plain (cross-alphabet) 20-way test episodes mix alphabets.
    plain = tasks.get_tasksets("omniglot-minimal", str(omniglot_root), ways=20, queries=1).test
    assert len({_alphabet_of(plain, c) for c in plain.sample(0).classes}) > 1


def test_within_alphabet_keeps_rotations_in_their_alphabet(minimal: dict) -> None:
    # Meta-train has x4 rotation classes; a rotated character stays in its alphabet.
    train = minimal["train"]
    sampler = TaskSampler(train, ways=5, shots=1, queries=1, seed=3, within_alphabet=True)
    assert sampler.alphabets == ["Balinese", "Early_Aramaic", "Greek", "Korean", "Latin"]
    rotated = 0
    for i in range(30):
        ep = sampler.sample(i)
        assert len({_alphabet_of(sampler, c) for c in ep.classes}) == 1
        rotated += sum("@rot0" not in train.class_name(int(c)) for c in ep.classes)
    assert rotated > 0  # rotation classes do take part


def test_within_alphabet_skips_small_alphabets_and_draws_alphabets_uniformly(
    tmp_path: Path,
) -> None:
    _write_split(tmp_path / "images_background_small1", {"Aa": 3, "Bb": 9, "Cc": 2})
    data = Omniglot(tmp_path, "background_small1")
    sampler = TaskSampler(data, ways=3, shots=1, queries=1, seed=0, within_alphabet=True)
    assert sampler.alphabets == ["Aa", "Bb"]
    counts = {"Aa": 0, "Bb": 0}
    for i in range(400):
        alphas = {_alphabet_of(sampler, c) for c in sampler.sample(i).classes}
        assert len(alphas) == 1
        counts[alphas.pop()] += 1
    # Alphabets are equally likely (not weighted by their 3 vs 9 characters): 200 +- 3 sd.
    assert 170 <= counts["Aa"] <= 230
    # Another seed gives other episodes; the same seed the same ones.
    other = TaskSampler(data, ways=3, shots=1, queries=1, seed=1, within_alphabet=True)
    same = TaskSampler(data, ways=3, shots=1, queries=1, seed=0, within_alphabet=True)
    firsts = [sampler.sample(i).classes.tolist() for i in range(10)]
    assert firsts == [same.sample(i).classes.tolist() for i in range(10)]
    assert firsts != [other.sample(i).classes.tolist() for i in range(10)]


def test_within_alphabet_errors_name_the_largest_alphabet_and_the_fix(
    omniglot_root: Path, minimal: dict
) -> None:
    with pytest.raises(EpisodeSpecError) as e:
        tasks.get_tasksets(
            "omniglot-minimal", str(omniglot_root), ways=20, queries=1, within_alphabet=True
        )
    msg = str(e.value)
    # 27 validation characters over 5 alphabets: the largest is Korean with 8.
    assert "validation split" in msg and "Korean, has 8" in msg and "lower ways to 8" in msg
    assert 'within_alphabet="test"' in msg and "within_alphabet=False" in msg
    # A dataset without alphabets.
    plain = tasks.TensorClassDataset.from_labels(torch.zeros(12, 1, 2, 2), np.arange(12) % 4)
    with pytest.raises(EpisodeSpecError, match="alphabet of each class"):
        TaskSampler(plain, ways=2, shots=1, queries=1, within_alphabet=True)
    with pytest.raises(ValueError, match="unknown split 'tests'"):
        tasks.get_tasksets("omniglot-minimal", str(omniglot_root), within_alphabet=["tests"])


def test_within_alphabet_on_the_full_split_layout(fake_full: Path) -> None:
    # omniglot_splits pools background and evaluation (ConcatClasses) and rotates meta-train.
    s = omniglot_splits(fake_full, num_train=8, num_validation=2)
    names = s["train"].class_alphabets()
    assert names is not None and len(names) == s["train"].num_classes == 32
    assert names == [s["train"].class_name(c).split("/")[0] for c in range(32)]
    sampler = TaskSampler(s["train"], ways=4, shots=1, queries=1, within_alphabet=True)
    for i in range(20):
        assert len({_alphabet_of(sampler, c) for c in sampler.sample(i).classes}) == 1


def test_within_alphabet_through_the_experiment_config(omniglot_root: Path, minimal: dict) -> None:
    # data.options go to get_tasksets as keyword arguments: no config schema change needed.
    from npbml.config import config_from_dict
    from npbml.train import make_tasksets

    data = {"name": "omniglot-minimal", "root": str(omniglot_root), "ways": 20, "queries": 1}
    cfg = config_from_dict({"data": {**data, "options": {"within_alphabet": "test"}}})
    ts = make_tasksets(cfg)
    assert ts.test.within_alphabet and ts.test.alphabets == ["Japanese_(katakana)", "Sanskrit"]


# ------------------------------------------------------------------------ bundled data (issue 14)


def test_bundled_zips_are_what_a_rootless_loader_reads(omniglot_root: Path) -> None:
    """The package ships the two minimal zips (official md5, checked above), with Lake's licence
    beside them, and ``root=None`` reads exactly those files."""
    from tasks.omniglot import PACKAGED_ROOT, PACKAGED_SPLITS, packaged_split

    assert omniglot_root == PACKAGED_ROOT
    for split in PACKAGED_SPLITS:
        path = packaged_split(split)
        assert path.parent == PACKAGED_ROOT and path.is_file()
        assert Omniglot(None, split).source == path
    licence = (PACKAGED_ROOT / "LICENSE").read_text()
    assert "MIT" in licence and "Brenden Lake" in licence


def test_no_root_reads_the_bundled_minimal_splits(minimal: dict) -> None:
    """root=None gives the same splits as the shared copy; a given root still wins."""
    bundled = omniglot_minimal_splits(None)
    for split in ("train", "validation", "test"):
        assert bundled[split].num_classes == minimal[split].num_classes
        last = bundled[split].num_classes - 1
        assert bundled[split].class_name(last) == minimal[split].class_name(last)
        assert torch.equal(bundled[split].class_images(last), minimal[split].class_images(last))
    ts = tasks.get_tasksets("omniglot-minimal", ways=5, shots=1, queries=1, seed=3)
    assert ts.test.sample(0).support_x.shape == (5, 1, 28, 28)
    with pytest.raises(DatasetNotFoundError, match="images_background_small1"):
        omniglot_minimal_splits(Path("/nonexistent-root"))


def test_damaged_bundled_zip_names_the_file_and_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tasks.omniglot as om

    for split in SMALL:
        name = f"images_{split}.zip"
        (tmp_path / name).write_bytes((om.PACKAGED_ROOT / name).read_bytes())
    bad = tmp_path / "images_background_small2.zip"
    bad.write_bytes(bad.read_bytes()[:-10] + b"0123456789")
    monkeypatch.setattr(om, "PACKAGED_ROOT", tmp_path)
    om.packaged_split("background_small1")  # an intact copy passes
    with pytest.raises(CorruptDatasetError, match="bundled .*damaged.*force-reinstall"):
        omniglot_minimal_splits(None)
    bad.unlink()
    with pytest.raises(DatasetNotFoundError, match="missing from this install"):
        om.packaged_split("background_small2")
    with pytest.raises(DatasetNotFoundError, match="'background' is not bundled"):
        Omniglot(None, "background")
