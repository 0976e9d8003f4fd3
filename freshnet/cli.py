"""The `freshnet` command: run, ingest, status, rollback, promote, serve, demo, config, dataset, quarantine."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, cast

from freshnet.config import Config, ConfigError
from freshnet.config_load import load_config
from freshnet.lease import LeaseHeld
from freshnet.redact import install_log_redaction, redact

EXIT_CONFIG = 2
EXIT_STOPPED = 3
EXIT_BUSY = 4
EXIT_DEGRADED = 5  # the night ran, but most searches failed or most downloads were rejected


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config)


def cmd_config_check(args: argparse.Namespace) -> int:
    cfg = load_config(args.file)
    # A git target may carry a token (http://user:TOKEN@host/...): never print it.
    print(
        redact(
            f"{args.file}: ok — {cfg.name}: {len(cfg.classes)} classes, source {cfg.source.kind}, "
            f"storage {cfg.storage}, space {cfg.space.target}"
        )
    )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """One nightly cycle in-process; Prefect starts its own temporary API when none is configured."""
    from freshnet.lease import Lease
    from freshnet.storage_open import open_storage

    cfg = load_config(args.config)  # fail fast, before Prefect starts, on a bad file
    # One embedded night per storage at a time: a second `freshnet run` says so at once instead
    # of doing the night's work and losing the catalog's compare-and-swap at the end.
    with Lease(open_storage(cfg.storage), "night-run", what=f"`freshnet run` of {args.config}"):
        return _run_night(args)


def _run_night(args: argparse.Namespace) -> int:
    # A loaded 2-core machine needs more than Prefect's default 20 s to start the temporary API;
    # telemetry would only try to reach the internet (and contends for the SQLite file).
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.nightly import nightly  # the orchestration layer, imported only for this command
    from freshnet.summary import format_summary

    # A night whose yield collapsed ends Failed ("Degraded") but still has its summary.
    state = nightly(config=args.config, night=args.night, return_state=True)
    outcome = state.result(raise_on_failure=False)
    if isinstance(outcome, BaseException):
        raise outcome
    result = cast("dict[str, Any]", outcome)  # the nightly flow returns the night's summary
    print()
    print(format_summary(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    if result.get("yield_problems"):
        print(f"freshnet: {state.message}", file=sys.stderr)
        return EXIT_DEGRADED
    return EXIT_STOPPED if result["outcome"] == "stopped" and args.strict else 0


def cmd_ingest(args: argparse.Namespace) -> int:
    """Search and download only (no Prefect): counts per class and reason."""
    from freshnet import cycle, summary

    cfg = _config(args)
    night = args.night or summary.today(cfg.prefect.timezone)
    searched = cycle.search_step(cfg, night)
    ingested = cycle.ingest_step(cfg, night, searched["key"])
    print(
        f"night {night}: {searched['candidates']} candidates, {ingested['accepted']} accepted, "
        f"{ingested['rejected']} not kept"
    )
    print(f"{'class':<20}{'status':<22}{'count':>7}")
    for label, by_status in sorted(ingested["counts"].items()):
        for status, n in sorted(by_status.items()):
            print(f"{label[:19]:<20}{status:<22}{n:>7}")
    for f in searched["failures"]:
        print(f"failed query: {f['label']!r} {f['query']!r}: {f['reason']}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from freshnet import cycle
    from freshnet.space import ledger

    cfg = _config(args)
    print(ledger.format_status(cycle.open_store(cfg)))
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    """Runs the rollback flow in-process: the same publish path, token and canary as nightly."""
    load_config(args.config)  # fail fast, before Prefect starts, on a bad file
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.rollback import rollback  # the orchestration layer, imported only for this command

    entry = rollback(config=args.config, version=args.version)
    print(f"rolled back: {entry['version']} is champion again (commit {entry['commit']})")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    """Runs the promote flow in-process: the same publish path, token and canary as nightly."""
    load_config(args.config)
    if not args.reason.strip():
        raise ConfigError("promote: --reason must say why (it is recorded in the ledger)")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.promote import promote

    entry = promote(config=args.config, version=args.version, reason=args.reason)
    print(f"promoted {entry['version']} by hand (commit {entry['commit']}): {args.reason}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from freshnet.space import serve

    cfg = _config(args)
    serve.serve(
        cfg.space.target,
        port=args.port or cfg.space.serve_port,
        poll_s=args.poll or cfg.space.serve_poll_s,
        feedback_dir=cfg.space.feedback_dir,
        front=not args.direct,
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import time

    from freshnet.data import demo

    cfg = _config(args)
    print(f"demo image web at {demo.ensure_server(cfg)} (Ctrl-C to stop)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0


def cmd_dataset_diff(args: argparse.Namespace) -> int:
    from freshnet import cycle
    from freshnet.data import snapshot

    cfg = _config(args)
    print(snapshot.format_diff(snapshot.diff_snapshots(cycle.open_store(cfg), args.a, args.b)))
    return 0


def cmd_quarantine(args: argparse.Namespace) -> int:
    from freshnet import cycle
    from freshnet.data import quarantine

    store = cycle.open_store(_config(args))
    if args.action == "list":
        print(quarantine.format_quarantine(quarantine.list_quarantine(store)))
        return 0
    if not args.sha:
        raise ConfigError(
            f"quarantine {args.action}: give the image sha256 (see 'quarantine list')"
        )
    if args.action == "release":
        quarantine.release(store, args.sha)
    elif args.action == "drop":
        quarantine.drop(store, args.sha)
    elif args.action == "relabel":
        if not args.label:
            raise ConfigError("quarantine relabel: --label is required")
        quarantine.relabel(store, args.sha, args.label)
    print(f"{args.action}: {args.sha} (applies from the next snapshot)")
    return 0


def cmd_feedback(args: argparse.Namespace) -> int:
    from freshnet import cycle
    from freshnet.data import feedback_review

    store = cycle.open_store(_config(args))
    if args.action == "list":
        print(feedback_review.format_pending(feedback_review.pending(store)))
        return 0
    if bool(args.sha) == args.all:
        raise ConfigError(
            f"feedback {args.action}: give image sha256 prefixes or --all (see 'feedback list')"
        )
    entries = feedback_review.review(store, None if args.all else args.sha, args.action == "accept")
    print(feedback_review.format_entries(entries) or "no feedback waiting for review")
    print("(applies from the next snapshot)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="freshnet", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    def add(
        name: str, fn: Callable[[argparse.Namespace], int], help: str, config: bool = True
    ) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        if config:
            sp.add_argument("--config", "-c", required=True, help="TOML config file")
        sp.set_defaults(fn=fn)
        return sp

    sp = add("run", cmd_run, "run one nightly cycle in-process")
    sp.add_argument("--night", help="night id (default: today's date)")
    sp.add_argument("--json", help="also write the summary to this JSON file")
    sp.add_argument("--strict", action="store_true", help="exit 3 when the cycle was stopped")
    sp = add("ingest", cmd_ingest, "search and download only; print counts per class and reason")
    sp.add_argument("--night")
    add("status", cmd_status, "champion, promotion history and the last decision")
    sp = add("rollback", cmd_rollback, "publish an earlier version again as a new commit")
    sp.add_argument(
        "version", nargs="?", help="version to restore (default: the previous champion)"
    )
    sp = add("promote", cmd_promote, "manual override: publish this version now")
    sp.add_argument("version")
    sp.add_argument("--reason", required=True)
    sp = add("serve", cmd_serve, "serve the Space repo's HEAD locally; redeploy on new commits")
    sp.add_argument("--port", type=int, help="default: space.serve_port (7860)")
    sp.add_argument("--poll", type=float, help="seconds between checks for a new commit")
    sp.add_argument(
        "--direct",
        action="store_true",
        help="the app binds the port itself (no front): each redeploy has a gap, logged",
    )
    add("demo", cmd_demo, "run the offline demo image web in the foreground")

    cp = sub.add_parser("config", help="config tools").add_subparsers(dest="what", required=True)
    sp = cp.add_parser("check", help="validate a config file")
    sp.add_argument("file")
    sp.set_defaults(fn=cmd_config_check)

    dp = sub.add_parser("dataset", help="dataset tools").add_subparsers(dest="what", required=True)
    sp = dp.add_parser(
        "diff", help="added/removed images per class and split between two snapshots"
    )
    sp.add_argument("--config", "-c", required=True)
    sp.add_argument("a")
    sp.add_argument("b")
    sp.set_defaults(fn=cmd_dataset_diff)

    sp = add("quarantine", cmd_quarantine, "review quarantined images")
    sp.add_argument("action", choices=["list", "release", "relabel", "drop"])
    sp.add_argument("sha", nargs="?")
    sp.add_argument("--label")
    sp = add("feedback", cmd_feedback, "review corrections sent from the app")
    sp.add_argument("action", choices=["list", "accept", "reject"])
    sp.add_argument("sha", nargs="*", help="sha256 prefixes (at least 6 characters)")
    sp.add_argument("--all", action="store_true", help="every image waiting for review")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    install_log_redaction()  # before anything logs: a git target may carry a token
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Every Prefect API call would otherwise be logged by httpx at INFO.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        rc: int = args.fn(args)
        return rc
    except ConfigError as exc:
        print(redact(f"freshnet: config error: {exc}"), file=sys.stderr)
        return EXIT_CONFIG
    except LeaseHeld as exc:
        print(f"freshnet: busy: {exc}", file=sys.stderr)
        return EXIT_BUSY
    except Exception as exc:
        # freshnet's own errors already say what was wrong and where: no traceback for those.
        if not type(exc).__module__.startswith("freshnet."):
            raise
        print(redact(f"freshnet: {type(exc).__name__}: {exc}"), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
