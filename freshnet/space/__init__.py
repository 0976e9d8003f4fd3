"""The Space: bundle, publish (Hub, git), ledger, and the local runner."""
