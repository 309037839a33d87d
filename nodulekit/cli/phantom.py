"""CLI commands of this stage (registered on the shared app)."""
from nodulekit.cli import app  # noqa: F401
