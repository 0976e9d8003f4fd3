#!/usr/bin/env bash
# The CPU worker: search, download, curate, evaluate, publish. See infra/README.md.
exec "$(dirname "${BASH_SOURCE[0]}")/worker.sh" cpu "$@"
