"""Fault injection: each module provokes one class of failure on a tiny CPU run and asserts the outcome (a clear
error or a clean recovery, nothing lost, no foreign code run). docs/checkpoints.md's guarantee table points here."""
