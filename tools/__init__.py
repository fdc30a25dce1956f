"""Evaluation harness for eclipse-stream: measure the defense the way the ECLIPSE paper does.

Entry point: ``python -m tools.evaluate <subcommand>`` (see docs/evaluation.md).
"""
