"""Optional experiment tracking for train.py: `--wandb-project NAME` logs every log line to
Weights & Biases; without it a no-op logger takes the calls, so the training loop has no
`if wandb:` branch. wandb is imported only when asked for and is not a dependency.
"""


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
