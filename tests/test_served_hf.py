"""Served mode publishing to a Hugging Face Space (the stand-in) with the token from the Secret block.

The stand-in accepts only the token infra/bootstrap.py put in the `hf-token` Secret block; the cpu
worker's own HF_TOKEN is wrong. Nightly, rollback and manual promote all publish, so all three
must read the block (the one publish path), and afterwards the Space and the ledger agree.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from freshnet.space.publish import HfPublisher, PublishError
from tests.hf_standin import HubStandIn
from tests.served_stack import HF_TOKEN, TEST_CONFIG_ENV, ServedStack

pytestmark = pytest.mark.slow

WRONG_TOKEN = "hf_wrongTEST_not_the_block_0000"
REPO_ID = "alice/served"


class HfServedStack(ServedStack):
    """The served stack with the cpu worker publishing to the HF stand-in."""

    def __init__(self, root, hub: HubStandIn):
        super().__init__(root, TEST_CONFIG_ENV)
        self.hub_env = {
            "FRESHNET_SPACE__TARGET": f"hf://spaces/{REPO_ID}",
            "HF_ENDPOINT": hub.url,
            "HF_TOKEN": WRONG_TOKEN,  # only the Secret block holds the right one
        }

    def worker_env(self, pool: str) -> dict[str, str]:
        env = super().worker_env(pool)
        if pool == "cpu":
            env.update(self.hub_env)
        return env


@pytest.fixture(scope="module")
def hf_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServedStack, HubStandIn]]:
    with HubStandIn(token=HF_TOKEN) as hub:
        s = HfServedStack(tmp_path_factory.mktemp("served-hf"), hub)
        try:
            s.start()
            yield s, hub
        finally:
            s.stop()
            print("\nserved hf stack timings:", s.summary_json())


def _finished(stack: ServedStack, run: dict) -> None:
    state = (run.get("state") or {}).get("type")
    message = (run.get("state") or {}).get("message")
    assert state == "COMPLETED", f"run {run['name']}: {state} {message}\n{stack.diagnostics()}"


def test_nightly_rollback_and_promote_publish_with_the_secret_block(hf_stack) -> None:
    stack, hub = hf_stack
    assert stack.api is not None
    assert "hf-token" in stack.bootstrap_output

    _finished(stack, stack.run_nightly("1"))
    store = stack.direct_storage()
    keys, _ = stack.ledger()
    assert len(keys) == 1, keys
    first = json.loads(store.get(keys[0]))

    # A second version to promote by hand: the first model under another name (cheap, no training).
    store.put("models/vmanual/model.pkl", store.get(first["model_key"]))
    run = stack.api.create_run(
        "promote/promote", {"version": "vmanual", "reason": "served promote test"}
    )
    _finished(stack, stack.api.wait(run["id"], 600))
    run = stack.api.create_run("rollback/rollback", {})  # default: before what the Space serves
    _finished(stack, stack.api.wait(run["id"], 600))

    keys, pointer = stack.ledger()
    entries = [json.loads(store.get(k)) for k in keys]
    assert [(e["kind"], e["version"]) for e in entries] == [
        ("promote", first["version"]),
        ("manual", "vmanual"),
        ("rollback", first["version"]),
    ]
    assert json.loads(pointer)["seq"] == entries[-1]["seq"]
    repo = hub.repos[REPO_ID]
    assert repo.sha == entries[-1]["commit"], "the Space must serve the ledger's champion"
    assert [c["sha"] for c in repo.commits[1:]] == [e["commit"] for e in entries]
    assert all(e["target"] == f"hf://spaces/{REPO_ID}" for e in entries)

    # Every commit carried the block's token; nothing was ever sent with the worker's HF_TOKEN.
    commits = [r for r in hub.requests if r.method == "POST" and "/commit/" in r.path]
    assert len(commits) == 3
    assert all(r.headers.get("authorization") == f"Bearer {HF_TOKEN}" for r in commits)
    assert not [r.path for r in hub.requests if WRONG_TOKEN in r.headers.get("authorization", "")]
    # And the stand-in does refuse that token (so the runs above could not have used it).
    with pytest.raises(PublishError, match="HTTP 401"):
        HfPublisher(REPO_ID, token=WRONG_TOKEN, endpoint=hub.url).head()
