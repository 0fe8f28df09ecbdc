"""What a user sees while long work runs: progress bars, and optional experiment tracking.

- `progress`: a tqdm bar with rate and ETA over a number of tokens, drawn on a terminal only, so
  log files and captured output stay clean (the fixed log lines of train.py carry the numbers).
- `make_logger`: `--wandb-project NAME` logs every log line to Weights & Biases, `--log-file
  FILE` to a JSON-lines file (loss curves with no account: plots.plot_training draws them);
  without either a no-op logger takes the calls, so the training loop has no `if wandb:` branch.
  wandb is imported only when asked for and is not a dependency.
"""
import json

from tqdm import tqdm


def progress(n_tokens, desc):
    """A bar with rate and ETA over n_tokens, on a terminal only: logs stay clean. desc None:
    no bar at all."""
    return tqdm(total=n_tokens, desc=desc, unit="tok", unit_scale=True, leave=False,
                disable=None if desc else True)


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


class FileLogger:
    """Each log call as one JSON line {"step": ..., key: value, ...}, flushed as it comes."""

    def __init__(self, path):
        self.file = open(path, "w")

    def log(self, metrics, step):
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()

    def finish(self):
        self.file.close()


class Loggers:
    def __init__(self, loggers):
        self.loggers = loggers

    def log(self, metrics, step):
        for logger in self.loggers:
            logger.log(metrics, step)

    def finish(self):
        for logger in self.loggers:
            logger.finish()


def make_logger(project, config, path=None):
    """Every log call to W&B (a project name) and to a JSON-lines file (path), or neither."""
    return Loggers(([WandbLogger(project, config)] if project else [])
                   + ([FileLogger(path)] if path else []))
