"""Benchmarks of eclipse-stream; run each as ``python -m benchmarks.<script>`` from the repository root."""
