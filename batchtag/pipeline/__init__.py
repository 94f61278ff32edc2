"""The client's pipeline, ``batchtag run``: sources -> resume -> payload -> client -> sink,
the progress bar and the summary. ``batch.run_batch`` is its entry point."""
