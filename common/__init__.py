"""Shared machinery of the numbered experiments, one room per concern: config and CLI (config), data,
augmentation (augment), models, the training loop (training), test-time adaptation (tta), a run's life
(lifecycle), the procedures' verbs (experiment), reading runs back (results), the report, figures (plots),
files and processes (plumbing), torchrun (distributed) and the speed comparison (bench).

01-06 call run(cli(CONFIG)); 07-09 write their procedure with the verbs of common.experiment (start,
load_data, new_model, train, test, adapt, finish) and launch(main, cli(CONFIG)). Importing the package
changes no global state.
"""
from .config import AUGMENT_04, CROSS_DOMAIN, Config, cli
from .errors import UserError
from .experiment import launch, run

__all__ = ["AUGMENT_04", "CROSS_DOMAIN", "Config", "UserError", "cli", "launch", "run"]
