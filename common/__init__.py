"""Shared machinery of the numbered experiments: config/CLI, data, models, training, results."""
from .config import Config, UserError, cli
from .experiment import run

__all__ = ["Config", "UserError", "cli", "run"]
