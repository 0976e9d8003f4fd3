"""Idempotent served-mode bootstrap: work pools, the gpu concurrency limit, the S3 bucket, the HF token.

Run it against the Prefect server the workers use (PREFECT_API_URL), as often as you like:

    PREFECT_API_URL=http://prefect-host:4200/api \\
    HF_TOKEN=hf_xxx \\
    .venv/bin/python infra/bootstrap.py --storage s3://my-bucket/freshnet

What it ensures (creating only what is missing, never deleting anything):
  * work pools ``cpu`` and ``gpu`` (type ``process`` unless --cpu-type/--gpu-type say otherwise);
  * the global concurrency limit ``gpu`` with limit 1 (one training at a time on the GPU);
  * the S3 bucket of --storage (or FRESHNET_STORAGE, or the ``storage`` of --config) when it is s3://;
  * the Secret block ``hf-token`` from the environment variable HF_TOKEN (skipped when unset);
  * when FRESHNET_NOTIFY_WEBHOOK_URL is set: a webhook notification block ``freshnet-notify`` and
    two automations, ``freshnet: nightly failed`` (a nightly/train run Failed, Crashed or TimedOut)
    and ``freshnet: model promoted`` (the event ``freshnet.model.promoted``).
  * the automation ``freshnet: crash runs without heartbeat``: a flow run whose process died with
    its worker (kill -9, machine lost) stops sending heartbeats; after --zombie-after-s seconds
    it is marked Crashed, so the nightly run waiting on it fails cleanly instead of hanging.
    Workers must send heartbeats: PREFECT_FLOWS_HEARTBEAT_FREQUENCY=30 (infra/worker.sh sets it).
Secret values are read from the environment only and never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

# Runs as a script from a checkout: make `freshnet` importable without installing it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


async def ensure_pool(name: str, pool_type: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.utilities import get_default_base_job_template_for_infrastructure_type

    async with get_client() as client:
        try:
            pool = await client.read_work_pool(name)
        except ObjectNotFound:
            pass
        else:
            if pool.type != pool_type:
                return f"exists with type {pool.type!r} (wanted {pool_type!r}; left unchanged)"
            return "exists"
        template = await get_default_base_job_template_for_infrastructure_type(pool_type)
        if template is None:
            raise SystemExit(f"bootstrap: unknown work pool type {pool_type!r} for pool {name!r}")
        try:
            await client.create_work_pool(
                WorkPoolCreate(name=name, type=pool_type, base_job_template=template)
            )
        except ObjectAlreadyExists:  # created concurrently by another bootstrap
            return "exists"
        return "created"


async def ensure_limit(name: str, limit: int) -> str:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    async with get_client() as client:
        try:
            before = (await client.read_global_concurrency_limit_by_name(name)).limit
        except ObjectNotFound:
            before = None
        await client.upsert_global_concurrency_limit_by_name(name, limit)
    if before is None:
        return "created"
    return "exists" if before == limit else f"updated (limit was {before})"


def ensure_secret(block_name: str, env_name: str) -> str:
    value = os.environ.get(env_name)
    if not value:
        return f"skipped ({env_name} is not set)"
    from prefect.blocks.system import Secret

    try:
        current = Secret.load(block_name).get()
    except ValueError:  # no such block yet
        current = None
    if current == value:
        return "exists"
    Secret(value=value).save(block_name, overwrite=True)
    return "created" if current is None else "updated"


NOTIFY_BLOCK = "freshnet-notify"
FAILED_AUTOMATION = "freshnet: nightly failed"
PROMOTED_AUTOMATION = "freshnet: model promoted"
PROMOTED_EVENT = "freshnet.model.promoted"
ZOMBIE_AUTOMATION = "freshnet: crash runs without heartbeat"


def ensure_notify_block(env_name: str) -> tuple[str, object | None]:
    """A generic JSON webhook (Slack incoming webhooks accept its ``{"text": ...}`` payload)."""
    url = os.environ.get(env_name)
    if not url:
        return f"skipped ({env_name} is not set)", None
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    block = CustomWebhookNotificationBlock(
        name="freshnet",
        url=url,
        json_data={"text": "{{subject}}\n{{body}}"},
    )
    block_id = block.save(NOTIFY_BLOCK, overwrite=True)
    return "saved", block_id


def automation_specs(block_id: object) -> list[dict]:
    """The two automations, as AutomationCore fields (documented in infra/README.md)."""
    flow_states = {
        "prefect.flow-run.Failed",
        "prefect.flow-run.Crashed",
        "prefect.flow-run.TimedOut",
    }
    return [
        {
            "name": FAILED_AUTOMATION,
            "description": "Notify when a nightly or train flow run fails, crashes or times out.",
            "trigger": {
                "type": "event",
                "posture": "Reactive",
                "expect": sorted(flow_states),
                "match": {"prefect.resource.id": "prefect.flow-run.*"},
                "match_related": {
                    "prefect.resource.role": "flow",
                    "prefect.resource.name": ["nightly", "train"],
                },
                "threshold": 1,
                "within": 0,
            },
            "actions": [
                {
                    "type": "send-notification",
                    "block_document_id": str(block_id),
                    "subject": "freshnet: {{ flow.name }} run {{ flow_run.name }} "
                    "{{ flow_run.state.name }}",
                    "body": "{{ flow_run.state.message }}\n{{ flow_run|ui_url }}",
                }
            ],
        },
        {
            "name": PROMOTED_AUTOMATION,
            "description": "Notify when a new champion was pushed to the Space.",
            "trigger": {
                "type": "event",
                "posture": "Reactive",
                "expect": [PROMOTED_EVENT],
                "match": {"prefect.resource.id": "freshnet.*"},
                "threshold": 1,
                "within": 0,
            },
            "actions": [
                {
                    "type": "send-notification",
                    "block_document_id": str(block_id),
                    "subject": "freshnet: promoted {{ event.payload.version }}",
                    "body": "{{ event.payload | tojson }}",
                }
            ],
        },
    ]


def zombie_spec(after_s: int) -> dict:
    """Prefect's recipe for runs whose process vanished: no heartbeat for ``after_s`` → Crashed."""
    return {
        "name": ZOMBIE_AUTOMATION,
        "description": f"Mark a flow run Crashed when it sent no heartbeat for {after_s} s "
        "(its worker or machine died); the run waiting on it then fails instead of hanging.",
        "trigger": {
            "type": "event",
            "posture": "Proactive",
            "after": ["prefect.flow-run.heartbeat"],
            "expect": [
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            ],
            "match": {"prefect.resource.id": "prefect.flow-run.*"},
            "for_each": ["prefect.resource.id"],
            "threshold": 1,
            "within": after_s,
        },
        "actions": [
            {
                "type": "change-flow-run-state",
                "state": "CRASHED",
                "message": f"No heartbeat for {after_s} s: the worker or its machine died.",
            }
        ],
    }


async def ensure_automations(specs: list[dict]) -> str:
    from prefect.client.orchestration import get_client
    from prefect.events.schemas.automations import AutomationCore

    outcomes = []
    async with get_client() as client:
        for spec in specs:
            automation = AutomationCore.model_validate(spec)
            existing = await client.read_automations_by_name(spec["name"])
            if existing:
                await client.update_automation(existing[0].id, automation)
                outcomes.append("updated")
            else:
                await client.create_automation(automation)
                outcomes.append("created")
    return ", ".join(outcomes)


def ensure_bucket(storage_uri: str | None) -> str:
    if not storage_uri:
        return "skipped (no storage URI: pass --storage, FRESHNET_STORAGE or --config)"
    if not storage_uri.startswith("s3://"):
        return f"skipped ({storage_uri} is not s3://)"
    from freshnet.storage_s3 import S3Storage

    store = S3Storage.from_uri(storage_uri)
    created = store.ensure_bucket()
    return f"{'created' if created else 'exists'} ({store.bucket} at {store.endpoint_url or 'AWS'})"


def storage_uri(args: argparse.Namespace) -> str | None:
    if args.storage:
        return args.storage
    if os.environ.get("FRESHNET_STORAGE"):
        return os.environ["FRESHNET_STORAGE"]
    if args.config:
        from freshnet.config_load import load_config

        return load_config(args.config).storage
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Idempotent served-mode bootstrap (see infra/README.md)."
    )
    parser.add_argument("--storage", help="s3://BUCKET/PREFIX whose bucket must exist")
    parser.add_argument("--config", help="freshnet config file to take `storage` from")
    parser.add_argument("--cpu-pool", default="cpu")
    parser.add_argument("--gpu-pool", default="gpu")
    parser.add_argument("--cpu-type", default="process", help="work pool type of the cpu pool")
    parser.add_argument("--gpu-type", default="process", help="e.g. process, docker, kubernetes")
    parser.add_argument("--gpu-limit", type=int, default=1, help="global concurrency limit 'gpu'")
    parser.add_argument("--hf-token-block", default="hf-token")
    parser.add_argument("--hf-token-env", default="HF_TOKEN")
    parser.add_argument("--notify-webhook-env", default="FRESHNET_NOTIFY_WEBHOOK_URL")
    parser.add_argument(
        "--zombie-after-s",
        type=int,
        default=120,
        help="mark a flow run Crashed after this many seconds without a heartbeat",
    )
    parser.add_argument("--skip-bucket", action="store_true")
    args = parser.parse_args(argv)

    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value()
    if not api:
        print(
            "bootstrap: PREFECT_API_URL is not set; point it at the server "
            "(e.g. http://127.0.0.1:4200/api)",
            file=sys.stderr,
        )
        return 2
    print(f"Prefect API: {api}")
    results = [
        (f"work pool {args.cpu_pool}", asyncio.run(ensure_pool(args.cpu_pool, args.cpu_type))),
        (f"work pool {args.gpu_pool}", asyncio.run(ensure_pool(args.gpu_pool, args.gpu_type))),
        (
            f"concurrency limit gpu={args.gpu_limit}",
            asyncio.run(ensure_limit("gpu", args.gpu_limit)),
        ),
        (
            "s3 bucket",
            "skipped (--skip-bucket)" if args.skip_bucket else ensure_bucket(storage_uri(args)),
        ),
        (
            f"secret block {args.hf_token_block}",
            ensure_secret(args.hf_token_block, args.hf_token_env),
        ),
    ]
    results.append(
        (
            "automation zombie runs",
            asyncio.run(ensure_automations([zombie_spec(args.zombie_after_s)])),
        )
    )
    notify, block_id = ensure_notify_block(args.notify_webhook_env)
    results.append((f"notification block {NOTIFY_BLOCK}", notify))
    if block_id is not None:
        results.append(
            ("automations notify", asyncio.run(ensure_automations(automation_specs(block_id))))
        )
    for what, outcome in results:
        print(f"  {what:<32} {outcome}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
