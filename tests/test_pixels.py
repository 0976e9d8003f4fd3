"""The decoded-image cache for training: incremental by sha, never stale, crash-safe, and the
cached loader's model exports without freshnet (real flower photos)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

from freshnet.model import pixels
from freshnet.model.pixels import PixelCache, PixelCacheError, decode_row
from tests.model_helpers import predict_in_clean_process

SIZE = 40


def _photos(flower_photos, dest: Path, n: int, start: int = 0) -> list[str]:
    """``n`` real photos copied to ``dest/<sha>.jpg``; their shas."""
    dest.mkdir(parents=True, exist_ok=True)
    srcs = (flower_photos["daisy"] + flower_photos["tulips"])[start : start + n]
    shas = []
    for src in srcs:
        data = src.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        (dest / f"{sha}.jpg").write_bytes(data)
        shas.append(sha)
    return shas


def _counting(monkeypatch) -> list[int]:
    """Count decodes (the expensive step the cache exists to skip)."""
    calls: list[int] = []

    def counted(data, size, method):
        calls.append(1)
        return decode_row(data, size, method)

    monkeypatch.setattr(pixels, "decode_row", counted)
    return calls


def _served(cache: PixelCache, images: Path, shas: list[str]) -> np.ndarray:
    rows, _ = cache.update(shas, lambda s: images / f"{s}.jpg")
    return np.asarray(cache.rows()[rows])


def _expected(images: Path, sha: str) -> np.ndarray:
    return decode_row((images / f"{sha}.jpg").read_bytes(), SIZE, "squish")


def test_cache_is_extended_incrementally_decoding_only_new_shas(
    tmp_path, flower_photos, monkeypatch
):
    images = tmp_path / "images"
    first = _photos(flower_photos, images, 8)
    cache = PixelCache(tmp_path / "cache", SIZE)
    calls = _counting(monkeypatch)
    rows1, stats1 = cache.update(first, lambda s: images / f"{s}.jpg")
    assert len(calls) == stats1.decoded == 8 and stats1.reused == 0
    before = (cache.dir / pixels.ROWS_FILE).read_bytes()

    # The next night: 4 new images among the old ones, in another order.
    second = _photos(flower_photos, images, 4, start=8) + first[::-1]
    calls.clear()
    rows2, stats2 = cache.update(second, lambda s: images / f"{s}.jpg")
    assert len(calls) == stats2.decoded == 4 and stats2.reused == 8
    # Old rows keep their place and bytes: the new rows were appended.
    assert dict(zip(first, rows1.tolist(), strict=True)) == dict(
        zip(second[4:], rows2[4:].tolist(), strict=True)
    )
    after = (cache.dir / pixels.ROWS_FILE).read_bytes()
    assert after[: len(before)] == before and len(after) == 12 * SIZE * SIZE * 3
    # A third night with nothing new decodes nothing; every served row is its own image.
    calls.clear()
    got = _served(cache, images, second)
    assert calls == []
    for sha, img in zip(second, got, strict=True):
        assert np.array_equal(img, _expected(images, sha)), sha


def test_corrupt_row_is_decoded_again_into_a_new_row(tmp_path, flower_photos, monkeypatch):
    images = tmp_path / "images"
    shas = _photos(flower_photos, images, 5)
    cache = PixelCache(tmp_path / "cache", SIZE)
    rows, _ = cache.update(shas, lambda s: images / f"{s}.jpg")
    # Bit rot in one row: a stripe of its pixels changes.
    rows_file = cache.dir / pixels.ROWS_FILE
    with open(rows_file, "r+b") as f:
        f.seek(int(rows[2]) * SIZE * SIZE * 3 + 100)
        f.write(bytes(range(200)))
    calls = _counting(monkeypatch)
    rows2, stats = cache.update(shas, lambda s: images / f"{s}.jpg")
    assert stats.rebuilt == 1 and stats.decoded == 1 and stats.reused == 4 and len(calls) == 1
    assert rows2[2] == 5  # appended, the damaged row is never written again
    assert rows2[[0, 1, 3, 4]].tolist() == rows[[0, 1, 3, 4]].tolist()
    for sha, img in zip(shas, np.asarray(cache.rows()[rows2]), strict=True):
        assert np.array_equal(img, _expected(images, sha)), sha


def test_never_serves_another_image_for_a_sha(tmp_path, flower_photos):
    images = tmp_path / "images"
    a, b = _photos(flower_photos, images, 2)
    cache = PixelCache(tmp_path / "cache", SIZE)
    rows, _ = cache.update([a, b], lambda s: images / f"{s}.jpg")
    # Another image's pixels land in a's row (a foreign writer, a restored backup): not served.
    arr = np.memmap(cache.dir / pixels.ROWS_FILE, dtype=np.uint8, mode="r+")
    arr = arr.reshape(-1, SIZE, SIZE, 3)
    arr[rows[0]] = arr[rows[1]]
    arr.flush()
    del arr
    got = _served(cache, images, [a, b])
    assert np.array_equal(got[0], _expected(images, a))
    assert not np.array_equal(got[0], got[1])

    # A file named by a sha but holding other bytes is refused, naming the file; nothing is cached.
    c = "c" * 64
    shutil.copy(images / f"{b}.jpg", images / f"{c}.jpg")
    with pytest.raises(PixelCacheError, match=rf"{c}\.jpg does not hold image {c}"):
        cache.update([a, c], lambda s: images / f"{s}.jpg")
    assert c not in {bytes(r["sha"]).hex() for r in cache.read_index()}

    # Another size or resize method is another cache, never these rows.
    other = PixelCache(tmp_path / "cache", SIZE + 8, "crop")
    rows_o, stats_o = other.update([a], lambda s: images / f"{s}.jpg")
    assert stats_o.decoded == 1 and other.rows()[rows_o].shape == (1, SIZE + 8, SIZE + 8, 3)


def test_a_crashed_append_leaves_no_valid_row(tmp_path, flower_photos, monkeypatch):
    images = tmp_path / "images"
    shas = _photos(flower_photos, images, 6)
    cache = PixelCache(tmp_path / "cache", SIZE)
    cache.update(shas[:2], lambda s: images / f"{s}.jpg")
    committed = cache.read_index().copy()

    # The process dies while appending: some rows are written, the index is not.
    done: list[int] = []

    def dies_on_third(data, size, method):
        if len(done) == 2:
            raise KeyboardInterrupt  # not an Exception: a kill, not a bad image
        done.append(1)
        return decode_row(data, size, method)

    monkeypatch.setattr(pixels, "decode_row", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        cache.update(shas, lambda s: images / f"{s}.jpg", workers=1)
    assert np.array_equal(cache.read_index(), committed)
    # Leftover bytes past the committed rows, and a torn index.tmp, are ignored.
    with open(cache.dir / pixels.ROWS_FILE, "ab") as f:
        f.write(b"\x07" * 1000)
    (cache.dir / (pixels.INDEX_FILE + ".tmp")).write_bytes(b"torn")

    monkeypatch.setattr(pixels, "decode_row", decode_row)
    rows, stats = cache.update(shas, lambda s: images / f"{s}.jpg")
    assert stats.decoded == 4 and stats.reused == 2
    for sha, img in zip(shas, np.asarray(cache.rows()[rows]), strict=True):
        assert np.array_equal(img, _expected(images, sha)), sha
    assert (cache.dir / pixels.ROWS_FILE).stat().st_size == 6 * SIZE * SIZE * 3


def test_gather_returns_requested_items_in_order(tmp_path, flower_photos):
    images = tmp_path / "images"
    shas = _photos(flower_photos, images, 4)
    cache = PixelCache(tmp_path / "cache", SIZE)
    rows, _ = cache.update(shas, lambda s: images / f"{s}.jpg")
    items = pixels.CachedImages(cache.rows(), rows, np.arange(4), ["a", "b", "c", "d"])
    x, y = items.gather([3, 0, 2])
    assert y.tolist() == [3, 0, 2]
    for k, i in enumerate([3, 0, 2]):
        assert np.array_equal(x[k], _expected(images, shas[i]))


@pytest.mark.slow
def test_cached_loader_trains_with_batch_augmentation_and_exports_without_freshnet(
    tmp_path, flower_photos
):
    """The cached loader (random resized crops from a larger cached row) trains; the model file
    carries the file pipeline and predicts in a clean process like in-process evaluation."""
    from freshnet.config_sections import TrainConfig
    from freshnet.model.evaluate import predict_files
    from freshnet.model.loaders import pixel_cache_size
    from freshnet.model.train import train_model
    from tests.test_train import flower_manifest

    manifest = flower_manifest(flower_photos, tmp_path / "images", ["daisy", "sunflowers"], 15)
    train = manifest[manifest["split"] == "train"]
    cfg = TrainConfig(
        image_size=64, batch_size=16, epochs=1, freeze_epochs=0, device="cpu", augment=True
    )
    assert cfg.loader == "cache" and pixel_cache_size(cfg) > 64
    res = train_model(
        train, tmp_path / "images", cfg, tmp_path / "m.pkl", cache_dir=tmp_path / "px"
    )
    cache = PixelCache(tmp_path / "px", pixel_cache_size(cfg))
    assert len(cache.read_index()) == len(train)  # it trained from the cache

    holdout = manifest[manifest["split"] == "holdout"]
    paths = [tmp_path / "images" / f"{s}.jpg" for s in holdout["sha256"]]
    out = predict_in_clean_process(res.model_path, paths, tmp_path / "space")
    assert out["vocab"] == ["daisy", "sunflowers"]
    predicted, _, _ = predict_files(res.model_path, paths)
    assert [p[0] for p in out["pred"]] == predicted


def test_a_sha_ending_in_zero_bytes_is_found_again(tmp_path, flower_photos):
    """numpy's S32 drops trailing NULs: a digest ending in 00 must still map to its row."""
    images = tmp_path / "images"
    images.mkdir()
    data = flower_photos["daisy"][0].read_bytes()
    # Bytes after a JPEG's end marker are ignored by decoders: vary them until the digest ends
    # in a zero byte (one try in 256 on average).
    for k in range(100_000):
        candidate = data + k.to_bytes(4, "big")
        sha = hashlib.sha256(candidate).hexdigest()
        if sha.endswith("00"):
            break
    (images / f"{sha}.jpg").write_bytes(candidate)
    cache = PixelCache(tmp_path / "cache", SIZE)
    first = _served(cache, images, [sha])
    again = _served(PixelCache(tmp_path / "cache", SIZE), images, [sha])
    assert np.array_equal(first[0], again[0])
    assert np.array_equal(again[0], decode_row(candidate, SIZE, "squish"))
