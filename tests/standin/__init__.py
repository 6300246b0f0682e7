"""A stdlib-only stand-in for LMDeploy 0.18's `api_server`, and the helpers tests use to run it."""
