"""The Space app: exact fastai inference, served through Gradio and driven by gradio_client."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from freshnet import space
from freshnet.config import SpaceConfig
from tests.space_helpers import ServedApp, bundle_meta, free_port, model_for_tests, split_flowers

APP = Path(__file__).resolve().parents[1] / "app"


@pytest.fixture(scope="session")
def space_model(flower_photos, tmp_path_factory) -> Path:
    return model_for_tests(flower_photos, tmp_path_factory)


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
    bundle = space.build_bundle(
        space_model,
        bundle_meta("v-served"),
        example_photos,
        root / "bundle",
        SpaceConfig(title="Flowers"),
    )
    with ServedApp(
        bundle, root, FRESHNET_FEEDBACK=str(root / "feedback"), FRESHNET_MAX_UPLOAD_MB="1"
    ) as app:
        yield {"url": app.url, "root": root, "bundle": bundle}


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


@pytest.mark.slow
def test_runner_redeploys_a_new_commit_within_60s(space_model, example_photos, tmp_path):
    """`freshnet serve`: publishing v2 to the Space repo makes the runner serve v2 by itself."""
    from gradio_client import Client

    from freshnet.serve import SpaceRunner

    target = str(tmp_path / "space")
    cfg = SpaceConfig(target=target)
    b1 = space.build_bundle(
        space_model, bundle_meta("v1"), example_photos[:1], tmp_path / "b1", cfg
    )
    c1 = space.publish(b1, target, "v1", None)
    runner = SpaceRunner(target, port=free_port(), work_dir=tmp_path / "work", poll_s=1.0)
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 240
        while runner.commit != c1 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert runner.commit == c1, "runner did not start the first commit"
        assert Client(runner.url, verbose=False).predict(api_name="/metadata")["version"] == "v1"

        b2 = space.build_bundle(
            space_model, bundle_meta("v2"), example_photos[:1], tmp_path / "b2", cfg
        )
        c2 = space.publish(b2, target, "v2", c1)
        published = time.monotonic()
        version = None
        while time.monotonic() - published < 60:
            try:
                version = Client(runner.url, verbose=False).predict(api_name="/metadata")["version"]
            except Exception:
                version = None  # the old app is gone and the new one is starting
            if version == "v2":
                break
            time.sleep(1)
        assert version == "v2", "runner did not serve v2 within 60 s"
        assert runner.commit == c2
    finally:
        runner.stop()
        thread.join(60)
    assert runner.proc is None


@pytest.mark.slow
def test_wait_space_sends_a_canary_to_the_served_app(served, example_photos, tmp_path):
    out = space.wait_space(str(tmp_path / "repo"), canary=example_photos[0], app_url=served["url"])
    assert out["stage"] == "RUNNING" and out["canary_label"] in bundle_meta("x")["classes"]
    with pytest.raises(space.PublishError, match="canary request to http://127.0.0.1:9/ failed"):
        space.wait_space(
            str(tmp_path / "repo"), canary=example_photos[0], app_url="http://127.0.0.1:9/"
        )
