# The server tests' fixtures: the tiny model with a chat template, and its engine builder.
from tests.server.conftest import tiny_loaded  # noqa: F401
