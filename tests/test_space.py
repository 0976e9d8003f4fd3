"""Space bundle, clean-process validation and the git / Hugging Face publishers."""

from __future__ import annotations

import ast
import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from freshnet.config_sections import SpaceConfig
from freshnet.space.bundle import (
    BundleError,
    build_bundle,
    bundle_files,
    judge_canaries,
    validate_bundle,
)
from freshnet.space.publish import (
    HfPublisher,
    PublishError,
    SpaceMoved,
    check_parent,
    commit_message,
    intent_mark,
    publish,
    publisher_for,
    space_head,
    wait_space,
)
from freshnet.storage import sha256_file
from tests.app_helpers import bundle_meta
from tests.hf_standin import HubStandIn

APP = Path(__file__).resolve().parents[1] / "app"


@pytest.fixture(scope="session")
def classifier(space_model):
    sys.path.insert(0, str(APP))
    try:
        import app  # the Space's own module, as the validator loads it
    finally:
        sys.path.remove(str(APP))
    return app.Classifier(space_model)


@pytest.fixture
def bundle(space_model, example_photos, tmp_path) -> Path:
    return build_bundle(
        space_model,
        bundle_meta("v1"),
        example_photos,
        tmp_path / "bundle",
        SpaceConfig(title="Flowers"),
    )


def _front_matter(readme: str) -> dict[str, str]:
    assert readme.startswith("---\n")
    block = readme.split("---\n")[1]
    return {
        k.strip(): v.strip().strip('"') for k, v in (ln.split(":", 1) for ln in block.splitlines())
    }


def test_bundle_layout_readme_and_metadata(bundle, example_photos):
    import gradio

    files = bundle_files(bundle)
    assert {"app.py", "requirements.txt", "README.md", "model.pkl", "metadata.json"} <= set(files)
    assert sorted(f for f in files if f.startswith("examples/")) == [
        f"examples/{p.name}" for p in example_photos
    ]
    fm = _front_matter((bundle / "README.md").read_text())
    assert fm["sdk"] == "gradio" and fm["app_file"] == "app.py"
    assert fm["sdk_version"] == gradio.__version__
    assert fm["title"] == "Flowers"
    readme = (bundle / "README.md").read_text()
    assert "snap-test" in readme and "0.8000" in readme  # model card: dataset and metrics
    meta = json.loads((bundle / "metadata.json").read_text())
    assert meta["version"] == "v1" and meta["model_sha256"] == sha256_file(bundle / "model.pkl")
    reqs = (bundle / "requirements.txt").read_text()
    assert "fastai==" in reqs and "torch==" in reqs
    # app.py is pushed as-is and imports nothing from freshnet
    tree = ast.parse((bundle / "app.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not {m for m in imported if m.split(".")[0] == "freshnet"}


def test_bundle_refuses_bad_inputs(space_model, tmp_path):
    with pytest.raises(BundleError, match="model file not found: .*nope.pkl"):
        build_bundle(tmp_path / "nope.pkl", bundle_meta("v1"), [], tmp_path / "b", SpaceConfig())
    with pytest.raises(BundleError, match="needs a 'version'"):
        build_bundle(space_model, {}, [], tmp_path / "b", SpaceConfig())
    text = tmp_path / "notes.txt"
    text.write_text("x")
    with pytest.raises(BundleError, match="notes.txt is not an image"):
        build_bundle(space_model, bundle_meta("v1"), [text], tmp_path / "b", SpaceConfig())


@pytest.mark.slow
def test_validate_bundle_in_clean_process(bundle, classifier, example_photos, flower_photos):
    canaries = [(p, next(iter(classifier.predict(p)))) for p in example_photos]
    canaries += [(ps[0], next(iter(classifier.predict(ps[0])))) for ps in flower_photos.values()]
    check = validate_bundle(bundle, canaries, latency_budget_s=5.0)
    assert check.ok, check.reason
    assert [p["label"] for p in check.predictions] == [label for _, label in canaries]
    assert 0 < check.latency_s < 5.0
    assert not list(bundle.rglob("__pycache__"))  # validation leaves the bundle as it was
    # Only the bundle, the standard library and site-packages: no repo, no cwd, no PYTHONPATH.
    assert check.sys_path[0] == str(bundle.resolve())
    prefixes = (sys.prefix, sys.base_prefix)
    assert all(p.startswith(prefixes) for p in check.sys_path[1:]), check.sys_path

    # The verdict on the same predictions with other expectations (no second clean process).
    wrong = [(path, "not-a-class") for path, _ in canaries]
    ok, reason = judge_canaries(wrong, check.predictions, 5.0)
    assert not ok and "corgi.jpg" in reason and "not-a-class" in reason
    ok, reason = judge_canaries(canaries, check.predictions, 1e-6)
    assert not ok and "over the 0.00 s budget" in reason
    ok, reason = judge_canaries(canaries, check.predictions[:-1], 5.0)
    assert not ok and "predicted 9 of 10" in reason


@pytest.mark.slow
def test_validate_bundle_refuses_model_needing_missing_module(
    space_model, example_photos, tmp_path
):
    """A learner whose loss function lives in a module the Space does not have is refused."""
    mod_dir = tmp_path / "only_here"
    mod_dir.mkdir()
    (mod_dir / "custom_loss_xyz.py").write_text(
        textwrap.dedent(
            """
            import torch.nn.functional as F
            def custom_loss(out, targ):
                return F.cross_entropy(out, targ)
            """
        )
    )
    broken = tmp_path / "broken.pkl"
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(mod_dir)!r})
        import custom_loss_xyz
        from fastai.learner import load_learner
        learn = load_learner({str(space_model)!r})
        learn.loss_func = custom_loss_xyz.custom_loss
        learn.export({str(broken)!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
    bundle = build_bundle(broken, bundle_meta("bad"), example_photos, tmp_path / "b", SpaceConfig())
    check = validate_bundle(bundle, [(example_photos[0], "daisy")], latency_budget_s=5.0)
    assert not check.ok
    assert "custom_loss_xyz" in check.reason and "ModuleNotFoundError" in check.reason


def test_validate_bundle_without_model(tmp_path):
    (tmp_path / "app.py").write_text("")
    check = validate_bundle(tmp_path, [], 1.0)
    assert not check.ok and "model.pkl" in check.reason


def _git(*args: str, cwd: Path) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout


def test_git_publish_local_path_one_commit_each(bundle, tmp_path):
    target = tmp_path / "space"
    assert space_head(str(target)) is None
    c1 = publish(bundle, str(target), "promote v1", None)
    assert space_head(str(target)) == c1
    assert "model.pkl" in _git("ls-tree", "--name-only", c1, cwd=target).split()
    assert (target / "model.pkl").is_file()  # the work tree follows pushes

    (bundle / "examples" / "corgi.jpg").unlink()  # a stale file must disappear from the Space
    c2 = publish(bundle, str(target), "promote v2", c1)
    assert _git("rev-list", "--count", "HEAD", cwd=target).strip() == "2"
    assert _git("rev-parse", f"{c2}^", cwd=target).strip() == c1
    assert "examples/corgi.jpg" not in _git("ls-tree", "-r", "--name-only", c2, cwd=target)

    with pytest.raises(SpaceMoved, match=f"is at {c2}, but the ledger expected {c1}"):
        publish(bundle, str(target), "promote v3", c1)
    assert space_head(str(target)) == c2  # refused: nothing changed


def test_git_publish_builds_only_on_the_exact_expected_head(bundle, tmp_path):
    """No "one freshnet commit ahead" guess: a head the ledger does not name is refused.

    (A lost ledger entry is recorded by the publish path from its intent, see
    tests/test_publish_faults.py, before the publisher is asked to build on it.)
    """
    target = str(tmp_path / "space")
    c1 = publish(bundle, target, "freshnet: promote v1", None)
    orphan = publish(bundle, target, "freshnet: promote v2 [freshnet-intent abc]", c1)
    with pytest.raises(SpaceMoved, match=f"is at {orphan}, but the ledger expected {c1}"):
        publish(bundle, target, "freshnet: promote v3", c1)
    assert space_head(target) == orphan
    assert intent_mark("abc") in commit_message(target, orphan)
    assert "freshnet-intent" not in commit_message(target, c1)


def test_git_publish_to_remote_url(bundle, tmp_path):
    remote = tmp_path / "remote.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(remote)], check=True)
    url = f"file://{remote}"
    c1 = publish(bundle, url, "first", None)
    c2 = publish(bundle, url, "second", c1)
    assert space_head(url) == c2
    assert _git("log", "--format=%s", "main", cwd=remote).split() == ["second", "first"]


def test_git_publish_refuses_non_repo_folder(bundle, tmp_path):
    target = tmp_path / "occupied"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(PublishError, match="not empty and is not a git repository"):
        publish(bundle, str(target), "x", None)
    assert (target / "keep.txt").read_text() == "mine"


def test_hf_publisher_commits_through_the_hub_api(bundle, monkeypatch, caplog):
    token = "hf_secret_token_value_123"
    with HubStandIn() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", token)
        caplog.set_level(logging.DEBUG)
        target = "hf://spaces/alice/flowers"
        assert space_head(target) is None
        c1 = publish(bundle, target, "promote v1", None)
        repo = hub.repos["alice/flowers"]
        assert c1 == repo.sha and len(repo.commits) == 2  # create_repo's initial commit + ours
        assert repo.files["model.pkl"] == (bundle / "model.pkl").read_bytes()
        assert set(bundle_files(bundle)) <= set(repo.files)
        creates = [r for r in hub.requests if r.path == "/api/repos/create"]
        create = json.loads(creates[0].body)
        assert create["type"] == "space" and create["sdk"] == "gradio"
        commits = [r for r in hub.requests if "/commit/" in r.path]
        assert len(commits) == 1  # one commit carries every file
        header = json.loads(commits[0].body.splitlines()[0])["value"]
        assert header["parentCommit"] == repo.commits[0]["sha"]
        api_calls = [r for r in hub.requests if r.path.startswith(("/api/spaces/", "/api/repos/"))]
        assert all(r.headers.get("authorization") == f"Bearer {token}" for r in api_calls)

        # second publish: guarded by the ledger's commit; a stale file is deleted in the same commit
        (bundle / "examples" / "husky.jpg").unlink()
        c2 = publish(bundle, target, "promote v2", c1)
        assert "examples/husky.jpg" not in repo.files and ".gitattributes" in repo.files
        header = json.loads(
            [r for r in hub.requests if "/commit/" in r.path][-1].body.splitlines()[0]
        )
        assert header["value"]["parentCommit"] == c1
        assert space_head(target) == c2
        assert wait_space(target, timeout_s=5)["stage"] == "RUNNING"
        assert "GET /api/spaces/alice/flowers/runtime" in hub.paths()
        hub.runtime_stage = "RUNTIME_ERROR"
        with pytest.raises(PublishError, match="failed to start: stage RUNTIME_ERROR"):
            wait_space(target, timeout_s=5)
    assert token not in caplog.text


def test_hf_publisher_refuses_when_space_moved(bundle, monkeypatch):
    with HubStandIn() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        target = "hf://spaces/alice/flowers"
        c1 = publish(bundle, target, "promote v1", None)
        other = hub.push_elsewhere("alice/flowers")
        with pytest.raises(SpaceMoved, match=f"is at {other}, but the ledger expected {c1}"):
            publish(bundle, target, "promote v2", c1)
        assert hub.repos["alice/flowers"].sha == other

        # The race the pre-check cannot see: the head moves between info and commit -> HTTP 412.
        pub = HfPublisher("alice/flowers")
        real_resolve = check_parent

        def move_then_check(*args):
            base = real_resolve(*args)
            hub.push_elsewhere("alice/flowers")
            return base

        monkeypatch.setattr("freshnet.space.publish.check_parent", move_then_check)
        with pytest.raises(SpaceMoved, match="HTTP 412"):
            pub.publish(bundle, "promote v2", other)
        assert len([r for r in hub.requests if "/commit/" in r.path]) == 2


def test_hf_publisher_builds_only_on_the_exact_expected_head(bundle, monkeypatch):
    with HubStandIn() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        target = "hf://spaces/alice/flowers"
        c1 = publish(bundle, target, "freshnet: promote v1", None)
        orphan = publish(bundle, target, "freshnet: promote v2 [freshnet-intent abc]", c1)
        with pytest.raises(SpaceMoved, match="someone else changed the Space"):
            publish(bundle, target, "freshnet: promote v3", c1)
        assert hub.repos["alice/flowers"].sha == orphan
        assert intent_mark("abc") in commit_message(target, orphan)
        assert commit_message(target, "0" * 40) == ""


def test_hf_publisher_with_a_wrong_token_is_refused(bundle, monkeypatch):
    with HubStandIn(token="hf_right") as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", "hf_wrong")
        target = "hf://spaces/alice/flowers"
        with pytest.raises(PublishError, match="HTTP 401"):
            publish(bundle, target, "freshnet: promote v1", None)
        assert hub.repos == {}
        c1 = publish(bundle, target, "freshnet: promote v1", None, token="hf_right")
        assert space_head(target, token="hf_right") == c1


def test_hf_target_errors():
    with pytest.raises(PublishError, match="owner/name"):
        publisher_for("hf://spaces/just-a-name")
    with pytest.raises(PublishError, match="hf://spaces/<owner>/<name>"):
        publisher_for("hf://models/a/b")


def test_runner_refuses_hf_targets_and_waits_for_a_first_commit(tmp_path):
    from freshnet.space.front import ServeError
    from freshnet.space.serve import SpaceRunner

    with pytest.raises(ServeError, match="served by Hugging Face itself"):
        SpaceRunner("hf://spaces/alice/flowers")
    runner = SpaceRunner(str(tmp_path / "empty"), port=1, work_dir=tmp_path / "work")
    assert runner.poll_once() is False and runner.commit is None and runner.proc is None
