#!/usr/bin/env bash
# Start a freshnet process worker: infra/worker.sh cpu|gpu [extra `prefect worker start` options]
#
# Needs: PREFECT_API_URL (the server), a checkout of this repo with its .venv on this machine,
# and for s3:// storage the AWS credentials (env, ~/.aws, or an instance role) plus, for a
# non-AWS endpoint, FRESHNET_S3_ENDPOINT_URL. Flow runs start in FRESHNET_PROJECT_DIR (the pull
# step of prefect.yaml), so relative paths in configs resolve against this checkout.
set -euo pipefail

pool="${1:?usage: infra/worker.sh cpu|gpu [prefect worker start options]}"
shift

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export FRESHNET_PROJECT_DIR="${FRESHNET_PROJECT_DIR:-$here}"
venv="${FRESHNET_VENV:-$FRESHNET_PROJECT_DIR/.venv}"

: "${PREFECT_API_URL:?set PREFECT_API_URL, e.g. http://prefect-host:4200/api}"
if [[ ! -x "$venv/bin/prefect" ]]; then
  echo "worker.sh: no Prefect in $venv (run 'make venv' in $FRESHNET_PROJECT_DIR or set FRESHNET_VENV)" >&2
  exit 2
fi

# Fail early with a readable message when the server is unreachable.
if ! "$venv/bin/python" - <<'PY'
import os, sys, urllib.request
url = os.environ["PREFECT_API_URL"].rstrip("/") + "/health"
try:
    urllib.request.urlopen(url, timeout=10).close()
except OSError as exc:
    sys.exit(f"worker.sh: Prefect API {url} is not reachable: {exc}")
PY
then
  exit 3
fi

# Flow runs send a heartbeat every 30 s; the bootstrap's automation marks silent runs Crashed.
export PREFECT_FLOWS_HEARTBEAT_FREQUENCY="${PREFECT_FLOWS_HEARTBEAT_FREQUENCY:-30}"

name="${FRESHNET_WORKER_NAME:-$pool-$(hostname)}"
echo "starting worker $name on pool $pool (project dir $FRESHNET_PROJECT_DIR)"
cd "$FRESHNET_PROJECT_DIR"
exec "$venv/bin/prefect" worker start --pool "$pool" --type process --name "$name" "$@"
