"""The Space app: exact fastai inference, served through Gradio and driven by gradio_client."""

from __future__ import annotations

import io
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from freshnet.config_sections import SpaceConfig
from freshnet.space.bundle import build_bundle
from tests.app_helpers import ServedApp, bundle_meta
from tests.model_helpers import split_flowers

APP = Path(__file__).resolve().parents[1] / "app"
# The served app deletes uploads this old (checked every UPLOAD_TTL_S // 2 s): long enough for
# any request of these tests to have finished with its upload.
UPLOAD_TTL_S = 10


@pytest.fixture(scope="module")
def app_module():
    sys.path.insert(0, str(APP))
    try:
        import app
    finally:
        sys.path.remove(str(APP))
    return app


@pytest.fixture(scope="module")
def classifier(app_module, space_model):
    return app_module.Classifier(space_model, compile=False)


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory, example_photos) -> list[Path]:
    """Inputs that exercise the loader: RGBA PNG, grayscale, a large image."""
    from PIL import Image

    root = tmp_path_factory.mktemp("odd")
    with Image.open(example_photos[0]) as im:
        im.convert("RGBA").save(root / "rgba.png")
        im.convert("L").save(root / "gray.jpg")
        im.resize((1200, 900)).save(root / "large.jpg")
    return sorted(root.iterdir())


@pytest.mark.slow
def test_probabilities_match_learn_predict(classifier, example_photos, flower_photos, odd_images):
    learn = classifier.learn
    images = example_photos + [ps[0] for ps in list(flower_photos.values())[:2]] + odd_images
    with learn.no_bar():
        for path in images:
            label, _, probs = learn.predict(path)
            ours = classifier.probabilities(path)
            np.testing.assert_allclose(ours, probs.numpy(), atol=1e-4, err_msg=str(path))
            assert next(iter(classifier.predict(path))) == label
    # Same transforms on bytes and on a PIL image as on the path.
    from PIL import Image

    data = example_photos[1].read_bytes()
    np.testing.assert_allclose(
        classifier.probabilities(data), classifier.probabilities(example_photos[1]), atol=1e-6
    )
    with Image.open(example_photos[1]) as im:
        np.testing.assert_allclose(
            classifier.probabilities(im.convert("RGB")),
            classifier.probabilities(example_photos[1]),
            atol=1e-6,
        )


@pytest.mark.slow
def test_compiled_model_matches_learn_predict_under_concurrency(
    app_module, space_model, example_photos, flower_photos
):
    """The app's default: torch.compile in the background, then one request at a time on it."""
    clf = app_module.Classifier(space_model, compile=True)
    learn = clf.learn
    images = example_photos + [ps[0] for ps in flower_photos.values()]
    with learn.no_bar():
        expected = {p: learn.predict(p)[2].numpy() for p in images}
    # Requests are answered (by the eager model) while compiling.
    np.testing.assert_allclose(clf.probabilities(images[0]), expected[images[0]], atol=1e-4)
    assert clf.fast_ready.wait(600), "compiling did not finish in 10 minutes"
    assert clf.fast is not None, "the compiled model was not adopted (see the log for why)"
    before = clf.fast_calls
    for path in images:
        np.testing.assert_allclose(clf.probabilities(path), expected[path], atol=1e-4)
    assert clf.fast_calls - before == len(images)

    # Four threads at once: the compiled model serves one, the eager model the others; all right.
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for path in images:
                np.testing.assert_allclose(clf.probabilities(path), expected[path], atol=1e-4)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert clf.fast is not None

    # An input the compiled guards were not built for must not recompile inside a request:
    # it is answered by the eager model and the app stays on eager from then on.
    import torch

    with torch.inference_mode():
        xb = clf._tensor(images[0]).contiguous()  # NCHW instead of channels-last
        out = clf._forward(xb)
        np.testing.assert_allclose(
            torch.softmax(out, -1)[0].numpy(), expected[images[0]], atol=1e-4
        )
    assert clf.fast is None
    torch.compiler.set_stance("default")  # the app sets it process-wide; leave none behind


@pytest.fixture(scope="module")
def served(space_model, example_photos, tmp_path_factory):
    """The bundle served by `python app.py`, exactly as the Space runs it."""
    root = tmp_path_factory.mktemp("served")
    bundle = build_bundle(
        space_model,
        bundle_meta("v-served"),
        example_photos,
        root / "bundle",
        SpaceConfig(title="Flowers"),
    )
    with ServedApp(
        bundle,
        root,
        FRESHNET_FEEDBACK=str(root / "feedback"),
        FRESHNET_MAX_UPLOAD_MB="1",
        GRADIO_TEMP_DIR=str(root / "gradio"),
        FRESHNET_UPLOAD_TTL_S=str(UPLOAD_TTL_S),
    ) as app:
        yield {"url": app.url, "root": root, "bundle": bundle, "pid": app.proc.pid}


@pytest.fixture(scope="module")
def client(served):
    from gradio_client import Client

    return Client(served["url"], verbose=False)


@pytest.mark.slow
def test_client_right_label_for_holdout_images(client, classifier, flower_photos):
    from gradio_client import handle_file

    _, holdout = split_flowers(flower_photos)
    for label, paths in holdout.items():
        served_labels = []
        for path in paths[:3]:
            result = client.predict(handle_file(str(path)), api_name="/predict")
            assert len(result["confidences"]) == 5
            assert result["label"] == next(iter(classifier.predict(path)))  # same as in-process
            served_labels.append(result["label"])
        assert label in served_labels, f"{label}: served top labels {served_labels}"


@pytest.mark.slow
def test_client_example_photos_and_metadata(client, example_photos, classifier):
    from gradio_client import handle_file

    for path in example_photos:
        result = client.predict(handle_file(str(path)), api_name="/predict")
        assert result["label"] in classifier.vocab
        confidences = [c["confidence"] for c in result["confidences"]]
        assert confidences == sorted(confidences, reverse=True) and sum(confidences) <= 1.0001
    meta = client.predict(api_name="/metadata")
    assert meta["version"] == "v-served" and meta["holdout_accuracy"] == 0.8
    assert meta["examples"] == [p.name for p in example_photos]


@pytest.mark.slow
def test_non_image_and_oversized_uploads_are_refused_kindly(client, served, tmp_path):
    from gradio_client import handle_file
    from PIL import Image

    fake = tmp_path / "notes.jpg"
    fake.write_text("<html>not a photo</html>")
    with pytest.raises(Exception, match="not an image"):
        client.predict(handle_file(str(fake)), api_name="/predict")
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (900, 900, 3), dtype=np.uint8)).save(
        big
    )
    assert big.stat().st_size > 1_000_000
    with pytest.raises(Exception, match="(?i)size|large|413"):
        client.predict(handle_file(str(big)), api_name="/predict")


@pytest.mark.slow
def test_feedback_is_written_for_the_feedback_source(client, served, example_photos):
    from gradio_client import handle_file

    predicted = {"label": "daisy", "confidences": [{"label": "daisy", "confidence": 0.7}]}
    text = client.predict(
        handle_file(str(example_photos[0])), predicted, "tulips", api_name="/feedback"
    )
    assert "tulips" in text
    records = list((served["root"] / "feedback" / "tulips").glob("*.json"))
    assert len(records) == 1
    record = json.loads(records[0].read_text())
    assert record["label"] == "tulips" and record["predicted"] == "daisy"
    assert record["model_version"] == "v-served" and record["probabilities"] == {"daisy": 0.7}
    image = records[0].with_suffix(".jpg")
    assert image.read_bytes()[:3] == b"\xff\xd8\xff"
    text = client.predict(
        handle_file(str(example_photos[0])), predicted, None, api_name="/feedback"
    )
    assert "Pick the correct label" in text


def _vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for {pid}")


@pytest.mark.slow
def test_pixel_bomb_upload_is_refused_kindly_without_decoding(client, served, tmp_path):
    """A 450 KB 12000² PNG used to raise the app's RSS by 2 GB; now it is refused from its header."""
    from gradio_client import handle_file

    from tests import badcorpus

    huge = tmp_path / "huge.png"
    huge.write_bytes(badcorpus.png_huge())
    before = _vm_hwm_mb(served["pid"])
    with pytest.raises(Exception, match=r"too large \(12000 × 12000 pixels\)") as info:
        client.predict(handle_file(str(huge)), api_name="/predict")
    assert "/" not in str(info.value).split("too large", 1)[1]
    grown = _vm_hwm_mb(served["pid"]) - before
    assert grown < 100, f"the app's peak RSS grew by {grown:.0f} MB"
    with pytest.raises(Exception, match="too large"):
        client.predict(handle_file(str(huge)), {}, "roses", api_name="/feedback")
    # 20000² is past Pillow's own limit, which Gradio meets when it opens the upload's header.
    past_pillow = tmp_path / "past-pillow.png"
    past_pillow.write_bytes(badcorpus.flat_png(20000, 20000, 8, 0, b"\x80"))
    with pytest.raises(Exception, match="too large"):
        client.predict(handle_file(str(past_pillow)), api_name="/predict")
    assert not list((served["root"] / "feedback").glob("roses/*"))


@pytest.mark.slow
def test_server_errors_do_not_show_server_paths(client, served, example_photos):
    from gradio_client import handle_file

    # The feedback folder for "roses" is a file: writing the correction fails on the server.
    blocker = served["root"] / "feedback" / "roses"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("in the way")
    try:
        with pytest.raises(Exception) as info:
            client.predict(handle_file(str(example_photos[0])), {}, "roses", api_name="/feedback")
    finally:
        blocker.unlink()
    message = str(info.value)
    assert "Something went wrong on our side" in message, message
    assert str(served["root"]) not in message and "roses" not in message, message


@pytest.mark.slow
def test_uploads_are_deleted_from_the_cache(client, served, example_photos, tmp_path):
    from gradio_client import handle_file
    from PIL import Image

    # Not an example photo: Gradio keeps the examples' cached copies (same content, same path).
    upload = tmp_path / "upload-once.jpg"
    with Image.open(example_photos[1]) as im:
        im.convert("RGB").save(upload, quality=71)
    cache = served["root"] / "gradio"
    client.predict(handle_file(str(upload)), api_name="/predict")
    uploads = [p for p in cache.rglob(upload.name) if p.is_file()]
    assert uploads, f"upload not found under {cache}"
    deadline = time.monotonic() + UPLOAD_TTL_S * 2 + 15
    while any(p.exists() for p in uploads) and time.monotonic() < deadline:
        time.sleep(1)
    assert not any(p.exists() for p in uploads), "uploads outlived FRESHNET_UPLOAD_TTL_S"


def _png(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _peak_rss_mb_of(code: str) -> float:
    """Peak RSS of a fresh Python running ``code`` with the app importable (VmHWM, not
    getrusage: Linux carries ru_maxrss across exec, so it would report pytest's own size)."""
    import subprocess

    script = f"import sys; sys.path.insert(0, {str(APP)!r}); import app\n{code}\n"
    script += (
        "print([l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1])"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    return int(out.stdout.split()[-1]) / 1024


def test_check_image_refuses_bombs_from_the_header(app_module, tmp_path):
    from tests import badcorpus

    huge = _png(tmp_path / "huge.png", badcorpus.png_huge())  # 12000² RGB, 450 KB
    sixteen = _png(tmp_path / "sixteen.png", badcorpus.png16_bomb())  # 7999² 16-bit
    rgba = _png(tmp_path / "rgba.png", badcorpus.flat_png(6000, 6000, 8, 6, b"\x80\x40\x20\xff"))
    with pytest.raises(app_module.ImageRefused, match=r"too large \(12000 × 12000 pixels\)"):
        app_module.check_image(huge)
    with pytest.raises(app_module.ImageRefused, match="too large"):
        app_module.check_image(sixteen)
    # 36 megapixels is under the pixel cap, but RGBA decoded and converted needs 8 bytes each.
    with pytest.raises(app_module.ImageRefused, match="too much memory") as info:
        app_module.check_image(rgba)
    assert "transparency" in str(info.value)
    # The same pixels in 8-bit grey fit.
    grey = _png(tmp_path / "grey.png", badcorpus.flat_png(6000, 6000, 8, 0, b"\x80"))
    app_module.check_image(grey)
    notes = tmp_path / "notes.png"
    notes.write_text("<html>")
    with pytest.raises(app_module.ImageRefused, match="not an image"):
        app_module.check_image(notes)
    for refused in (huge, rgba, notes):
        with pytest.raises(app_module.ImageRefused) as info:
            app_module.check_image(refused)
        assert str(tmp_path) not in str(info.value) and "/" not in str(info.value)
    # Only the header was read: checking the 12000² PNG costs no memory.
    peak = _peak_rss_mb_of(f"""
try:
    app.check_image({huge!r})
except app.ImageRefused:
    pass
""")
    assert peak < 150, f"peak RSS {peak:.0f} MB"


def test_check_image_caps_come_from_the_environment(app_module, tmp_path, monkeypatch):
    from tests import badcorpus

    photo = _png(tmp_path / "photo.jpg", badcorpus.big_jpeg())  # 1200x800
    app_module.check_image(photo)
    monkeypatch.setenv("FRESHNET_MAX_PIXELS", "500000")
    with pytest.raises(app_module.ImageRefused, match="at most 0.5 megapixels"):
        app_module.check_image(photo)
    monkeypatch.setenv("FRESHNET_MAX_PIXELS", "5000000")
    monkeypatch.setenv("FRESHNET_MAX_DECODE_MB", "1")
    with pytest.raises(app_module.ImageRefused, match="too much memory"):
        app_module.check_image(photo)


def test_feedback_fields_are_bounded_and_image_normalised(app_module, tmp_path, example_photos):
    from PIL import Image

    classes = ["daisy", "dandelion", "roses", "sunflowers", "tulips"]
    sink = app_module.FeedbackSink(str(tmp_path / "fb"), classes=classes)
    upload = tmp_path / "upload.png"
    with Image.open(example_photos[0]) as im:
        big = im.convert("RGBA").resize((1600, 1200))
    big.paste((0, 0, 0, 0), (0, 0, 400, 1200))  # a transparent left quarter
    big.save(upload)
    fake = {f"c{i}": 0.5 for i in range(20_000)}
    fake.update(
        {"roses": 0.6, "daisy": 0.2, "tulips": float("nan"), "dandelion": 7, "sunflowers": True}
    )
    fid = sink.write(str(upload), "roses", fake, "v" * 10_000)

    record_path = tmp_path / "fb" / "roses" / f"{fid}.json"
    record = json.loads(record_path.read_text())
    assert record["probabilities"] == {"roses": 0.6, "daisy": 0.2}  # known classes, valid values
    assert record["predicted"] == "roses" and record["label"] == "roses"
    assert len(record["model_version"]) == app_module.MAX_TEXT
    assert record_path.stat().st_size < 1024
    with Image.open(record_path.with_suffix(".jpg")) as im:
        assert im.format == "JPEG" and im.mode == "RGB" and im.size == (400, 300)
        assert min(im.getpixel((20, 150))) > 240  # transparency on white, like ingest
    assert record_path.with_suffix(".jpg").stat().st_size < 100_000

    with pytest.raises(ValueError, match="not one of the model's classes"):
        sink.write(str(upload), "../../etc", {}, "v1")
    assert sorted(p.name for p in (tmp_path / "fb").iterdir()) == ["roses"]


def test_feedback_refuses_a_pixel_bomb(app_module, tmp_path):
    from tests import badcorpus

    sink = app_module.FeedbackSink(str(tmp_path / "fb"), classes=["roses"])
    with pytest.raises(app_module.ImageRefused, match="too large"):
        sink.write(_png(tmp_path / "huge.png", badcorpus.png_huge()), "roses", {}, "v1")
    assert not (tmp_path / "fb").exists()


def test_normalise_image_handles_sixteen_bit_and_orientation(app_module, tmp_path):
    from PIL import Image

    from tests import badcorpus

    arr = np.full((1200, 1600), 40000, dtype=np.uint16)
    sixteen = tmp_path / "sixteen.png"
    Image.fromarray(arr).save(sixteen)
    with Image.open(io.BytesIO(app_module.normalise_image(sixteen))) as im:
        assert im.size == (400, 300) and abs(im.getpixel((200, 150))[0] - 156) <= 2
    rotated = tmp_path / "rotated.jpg"
    rotated.write_bytes(badcorpus.exif_rotated_jpeg())
    with Image.open(io.BytesIO(app_module.normalise_image(rotated))) as im:
        assert im.size == (120, 240) and im.getpixel((60, 20))[0] > 200  # red on top


class _StubError(Exception):
    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def test_user_errors_never_show_server_details(app_module, tmp_path):
    gr = type("gr", (), {"Error": _StubError})
    secret = str(tmp_path / "feedback" / "roses" / "x.json")

    @app_module._user_errors(gr)
    def crashes() -> None:
        raise PermissionError(13, "Permission denied", secret)

    @app_module._user_errors(gr)
    def gradio_error() -> None:
        raise _StubError(f"File {secret} is not in the upload folder")

    @app_module._user_errors(gr)
    def refused() -> None:
        raise app_module.ImageRefused("This photo is too large.")

    with pytest.raises(_StubError) as info:
        crashes()
    assert info.value.message == app_module.SERVER_ERROR
    with pytest.raises(_StubError) as info:
        gradio_error()
    assert secret not in info.value.message and "upload folder" in info.value.message
    with pytest.raises(_StubError, match="too large"):
        refused()
