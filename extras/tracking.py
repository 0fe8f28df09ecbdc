"""Experiment tracking: `--wandb-project NAME` logs every log line to Weights & Biases,
`--log-file FILE` to a JSON-lines file (loss curves with no account: plots.plot_training draws
them); without either a no-op logger takes the calls, so the training loop has no `if wandb:`
branch. wandb is imported only when asked for and is not a dependency. Progress bars are
data.progress.
"""
import json


class WandbLogger:
    def __init__(self, project, config):
        try:
            import wandb
        except ImportError:
            raise ValueError(f"--wandb-project {project} needs wandb: pip install wandb") from None
        self.run = wandb.init(project=project, config=config)

    def log(self, values, step):
        self.run.log(values, step=step)

    def finish(self):
        self.run.finish()


class FileLogger:
    """Each log call as one JSON line {"step": ..., key: value, ...}, flushed as it comes."""

    def __init__(self, path):
        self.file = open(path, "w")

    def log(self, values, step):
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()

    def finish(self):
        self.file.close()


class Loggers:
    """Every call to each of some loggers (none: a no-op)."""

    def __init__(self, loggers):
        self.loggers = loggers

    def log(self, values, step):
        for logger in self.loggers:
            logger.log(values, step)

    def finish(self):
        for logger in self.loggers:
            logger.finish()


def make_logger(project=None, config=None, path=None, rank=0):
    """Every log call to W&B (a project name) and to a JSON-lines file (path), or neither; only
    rank 0 logs."""
    loggers = []
    if rank > 0:
        return Loggers(loggers)
    if project:
        loggers.append(WandbLogger(project, config))
    if path:
        loggers.append(FileLogger(path))
    return Loggers(loggers)
