"""Training the project's own models on generated tasks: the small MLLM (``mmrag train-tiny``)."""
