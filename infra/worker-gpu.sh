#!/usr/bin/env bash
# The GPU worker: runs the `train` deployment. One training at a time (concurrency limit `gpu`).
exec "$(dirname "${BASH_SOURCE[0]}")/worker.sh" gpu --limit 1 "$@"
