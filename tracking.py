"""What a user sees while long work runs: progress bars, and optional experiment tracking.

- `progress`: a tqdm bar with rate and ETA over a number of tokens, drawn on a terminal only, so
  log files and captured output stay clean (the fixed log lines of train.py carry the numbers).
- `make_logger`: `--wandb-project NAME` logs every log line to Weights & Biases; without it a
  no-op logger takes the calls, so the training loop has no `if wandb:` branch. wandb is imported
  only when asked for and is not a dependency.
"""
from tqdm import tqdm


def progress(n_tokens, desc):
    """A bar with rate and ETA over n_tokens, on a terminal only: logs stay clean. desc None:
    no bar at all."""
    return tqdm(total=n_tokens, desc=desc, unit="tok", unit_scale=True, leave=False,
                disable=None if desc else True)


class NullLogger:
    """Takes log calls and does nothing."""

    def log(self, metrics, step):
        pass

    def finish(self):
        pass


class WandbLogger:
    def __init__(self, project, config):
        try:
            import wandb
        except ImportError:
            raise ValueError(f"--wandb-project {project} needs wandb: pip install wandb") \
                from None
        self.run = wandb.init(project=project, config=config)

    def log(self, metrics, step):
        self.run.log(metrics, step=step)

    def finish(self):
        self.run.finish()


def make_logger(project, config):
    """A WandbLogger for a project name, else a NullLogger."""
    return WandbLogger(project, config) if project else NullLogger()
