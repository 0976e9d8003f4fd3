"""URL credentials never leave the process: redact(), logs, `config check`, the failure webhook
and the train deployment's parameters, with a git target that carries a token."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from freshnet import cli
from freshnet.config import parse_config
from freshnet.redact import RedactingFilter, install_log_redaction, redact, redact_value
from tests.served_stack import Inbox

REPO = Path(__file__).resolve().parents[1]
TOKEN = "hf_SeCrEtToKeN123"
TARGET = f"http://user:{TOKEN}@git.example.org/space.git"
SAFE = "http://***@git.example.org/space.git"


@pytest.mark.parametrize(
    ("text", "want"),
    [
        (TARGET, SAFE),
        (f"push to {TARGET} failed", f"push to {SAFE} failed"),
        (f"https://{TOKEN}@github.com/o/r.git", "https://***@github.com/o/r.git"),
        ("http://user:p@ss@host/x", "http://***@host/x"),  # unescaped "@" in the password
        (f"'{TARGET}' and \"s3://k:{TOKEN}@b/p\"", f"'{SAFE}' and \"s3://***@b/p\""),
        (f"a {TARGET}\nb https://u:{TOKEN}@h:8080/", f"a {SAFE}\nb https://***@h:8080/"),
    ],
)
def test_redact_hides_userinfo(text, want):
    assert redact(text) == want
    assert TOKEN not in redact(text)


@pytest.mark.parametrize(
    "text",
    [
        "http://host/path?mail=a@b.org",  # an "@" after the path is no credential
        "git@github.com:owner/repo.git",  # scp-like: a user name, no token
        "hf://spaces/owner/name",
        "contact me@example.org",
        "",
    ],
)
def test_redact_leaves_other_text_alone(text):
    assert redact(text) == text


def test_redact_value_walks_json_like_values():
    value = {"space": {"target": TARGET, "n": 3}, "list": [TARGET, 1.5, None], "t": (TARGET,)}
    assert redact_value(value) == {
        "space": {"target": SAFE, "n": 3},
        "list": [SAFE, 1.5, None],
        "t": (SAFE,),
    }
    assert TOKEN in value["space"]["target"]  # the input is not changed


def _capture(logger: logging.Logger) -> io.StringIO:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(name)s %(message)s"))
    logger.addHandler(handler)
    return out


def test_filter_redacts_message_args_and_traceback():
    logger = logging.getLogger("test_redact.filter")
    logger.propagate = False
    out = _capture(logger)
    logger.addFilter(RedactingFilter())
    logger.warning("pushing to %s", TARGET)
    try:
        raise RuntimeError(f"git push {TARGET} refused")
    except RuntimeError:
        logger.exception("publish failed")
    text = out.getvalue()
    assert TOKEN not in text
    assert f"pushing to {SAFE}" in text and f"RuntimeError: git push {SAFE} refused" in text


def test_installed_redaction_covers_every_logger():
    """Child loggers (freshnet.cycle, prefect.flow_runs) propagate past a logger's own filters:
    the installed redaction still hides the token in whatever handler receives the record."""
    install_log_redaction()
    install_log_redaction()  # idempotent
    root = logging.getLogger("test_redact_root")
    root.propagate = False
    out = _capture(root)
    child = logging.getLogger("test_redact_root.freshnet.cycle")
    child.setLevel(logging.INFO)
    child.info("space %s at %s", TARGET, "head")
    try:
        raise ValueError(TARGET)
    except ValueError:
        child.exception("failed")
    assert TOKEN not in out.getvalue()
    assert f"space {SAFE} at head" in out.getvalue()


def _config_file(tmp_path: Path, target: str = TARGET, storage: str | None = None) -> Path:
    p = tmp_path / "cfg.toml"
    lines = [
        'classes = ["a", "b"]',
        f'storage = "{storage or "file://" + str(tmp_path / "store")}"',
        "[space]",
        f'target = "{target}"',
    ]
    p.write_text("\n".join(lines) + "\n")
    return p


def test_config_check_output_redacts_the_space_target(tmp_path, capsys):
    assert cli.main(["config", "check", str(_config_file(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert TOKEN not in out and f"space {SAFE}" in out


def test_config_error_output_redacts_urls(tmp_path, capsys):
    bad = _config_file(tmp_path, storage=f"https://user:{TOKEN}@store.example.org/b")
    assert cli.main(["config", "check", str(bad)]) == cli.EXIT_CONFIG
    err = capsys.readouterr().err
    assert "storage" in err and "https://***@store.example.org/b" in err and TOKEN not in err


@pytest.fixture
def hooks_log():
    """What flows.hooks logs (a handler of its own: importing Prefect reconfigures the root)."""
    from flows import hooks

    logger = logging.getLogger(hooks.__name__)
    out = _capture(logger)
    yield out
    logger.handlers.pop()


def test_failure_webhook_and_log_are_redacted(monkeypatch, hooks_log):
    from flows.hooks import notify_failure

    inbox = Inbox()
    try:
        monkeypatch.setenv("FRESHNET_WEBHOOK_URL", inbox.url)
        monkeypatch.setenv("no_proxy", "127.0.0.1")
        state = SimpleNamespace(name="Failed", message=f"git push to {TARGET} was rejected")
        notify_failure(SimpleNamespace(name="nightly"), SimpleNamespace(name="night-7"), state)
    finally:
        inbox.stop()
    (body,) = inbox.messages
    text = json.loads(body)["text"]
    assert text == f"freshnet: flow run night-7 (nightly) Failed: git push to {SAFE} was rejected"
    assert TOKEN not in hooks_log.getvalue() and text in hooks_log.getvalue()


def test_failure_webhook_with_credentials_in_its_own_url_never_raises(monkeypatch, hooks_log):
    from flows.hooks import notify_failure

    # Nothing listens there, and urllib refuses user-info in a URL: neither may mask the failure.
    monkeypatch.setenv("FRESHNET_WEBHOOK_URL", f"http://hook:{TOKEN}@127.0.0.1:9/x")
    state = SimpleNamespace(name="Crashed", message="worker lost")
    notify_failure(SimpleNamespace(name="nightly"), SimpleNamespace(name="n"), state)
    assert "did not answer" in hooks_log.getvalue() and TOKEN not in hooks_log.getvalue()


def test_train_deployment_parameters_carry_a_redacted_target():
    from flows.hooks import train_config

    cfg = parse_config({"classes": ["a", "b"], "space": {"target": TARGET}})
    params = train_config(cfg)
    assert TOKEN not in json.dumps(params)
    assert params["space"]["target"] == SAFE
    # The train flow parses it back; everything training reads is unchanged.
    again = parse_config(params, "train flow parameter 'config'")
    assert again.model_dump(exclude={"space"}) == cfg.model_dump(exclude={"space"})
    assert cfg.space.target == TARGET  # the nightly's own config keeps the real target
