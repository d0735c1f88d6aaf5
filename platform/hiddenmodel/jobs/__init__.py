"""Image jobs: submit, dispatch, run, notify."""
