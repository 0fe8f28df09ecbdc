"""The training recipe of §3.3.2, and one SAE with its optimizer (`Trainer`).

- `budget_rule`: the paper's recipe (2048 tokens per step, each row once, biases at 0) at paper
  scale; a short run serves each LM row several times, takes smaller batches and starts its
  biases at the data mean.
- `Schedule`: linear warm-up, constant lr, linear decay over the last 20% of steps; K annealed
  linearly from D down to K over the first 10% of steps (`lr_at`, `k_at`).
- `first_fill`: the buffer's first rows set the outlier norm limit and the dataset norms.
- `Trainer`: one SAE (this rank's shard of it), its Adam optimizer, one step, and the running
  statistics of its log line (loss, EV, L0, dead share over the last 100K rows, §4.4).
The SAE's math is sae.py's, distribution parallel.py's; train.py runs the loop.
Shapes: N rows, D model width, F features, K active.
"""
import dataclasses
import math

import torch

import data
import model
import parallel
from metrics import firing_counts

PAPER_WARMUP = 10_000  # steps of linear lr warm-up (§3.3.2; released: 5000)
SHORT_RUN = 50_000_000  # tokens per SAE: a shorter run reuses its rows (the paper: 800M, 1.6B)
MAX_PASSES = 8  # a short run serves each LM row up to this many times
STEPS_PER_BATCH_SIZE = 16_384  # batch <= rows served / this, within 256..2048
DEAD_WINDOW = 100_000  # rows served: a feature silent for this many is counted dead (§4.4)
RECENT_WINDOW = 4096  # rows served: the window of `recent`, which features fire now (Fig. 12)


def budget_rule(total_tokens, passes=None, batch_size=None, init_bias=None, cost_ratio=None):
    """(passes, batch_size, init_bias, the rule as printed) for total_tokens of data per SAE;
    what is given (not None) is kept.

    The paper's recipe (2048 tokens per step, each row once) is for 390K steps. A short run with
    it makes a few hundred steps, most of them in warm-up, K-annealing and decay, and leaves
    features dead. So a run under SHORT_RUN tokens serves each row several times (the buffer
    keeps a row until it has been served that often) when rows are costly: cost_ratio is what
    making a row costs (the LM forward to the deepest site) against training every SAE it feeds
    on it (extras/plan.costs; on 2 CPU cores ~0.4 ms per token to layer 15 against ~0.1 ms per
    row of one 8x SAE there: 4). A row is served up to 2 x cost_ratio times, at most MAX_PASSES:
    then making rows takes at most a third of the time, and a scope of many SAEs on one forward,
    where rows are cheap, takes fresh rows instead. None (a single --activations file, which
    names no LM): the token budget alone decides; a cache's rows count as its LM's.
    The batch shrinks toward 16K steps: the largest power of two <= rows served / 16384, within
    256..2048 (the floor keeps the per-step overhead small on CPU). A short run also starts its
    biases at the data mean (`SAE.set_norms_`): with few steps, features that all read the same
    large mean at step 0 lose TopK for good (docs/choices.md). At paper scale this is the
    paper's recipe, biases at 0 included."""
    chosen = {}  # what the rule chose, for the printed line
    if passes is None:
        passes = min(MAX_PASSES, max(1, SHORT_RUN // max(total_tokens, 1)))
        if cost_ratio is not None:
            passes = min(passes, max(1, int(2 * cost_ratio)))
        chosen["passes"] = passes
    if batch_size is None:
        per_step = max(1, total_tokens * passes // STEPS_PER_BATCH_SIZE)
        batch_size = min(2048, max(256, 2 ** int(math.log2(per_step))))
        chosen["batch size"] = batch_size
    if init_bias is None:
        init_bias = "mean" if total_tokens < SHORT_RUN else "zero"
        chosen["init bias"] = init_bias
    if not chosen:
        return passes, batch_size, init_bias, "as given"
    row_cost = ""
    if cost_ratio is not None:
        row_cost = (f", and up to 2x what a row costs against the SAE steps it feeds (here "
                    f"{cost_ratio:.2g}x)")
    choices = ", ".join(f"{name} {value}" for name, value in chosen.items())
    rule = (f"budget rule for {total_tokens:,} tokens: {choices} (runs under "
            f"{SHORT_RUN // 1_000_000}M tokens serve each row up to {MAX_PASSES}x{row_cost}, "
            f"and start their biases at the mean; batch = rows served / {STEPS_PER_BATCH_SIZE}, "
            f"256..2048)")
    return passes, batch_size, init_bias, rule


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The schedule of §3.3.2 in steps, and its lr, K and (Vanilla) L1 weight at any step."""
    steps: int  # in all
    warmup: int  # linear lr warm-up from 0
    decay: int  # linear lr decay at the end, to lr_end
    k_anneal_steps: int  # K from k_init down to k
    l1_warmup: int = 0  # Vanilla: the L1 weight from 0 up to l1_coef
    lr: float = 8e-4
    lr_end: float = 0.0
    k: int = 50
    k_init: int = 0  # K at step 0: D unless told, set once D is known
    l1_coef: float = 0.0

    def lr_at(self, step):
        return lr_at(step, self.steps, self.lr, self.warmup, self.decay, self.lr_end)

    def k_at(self, step):
        return k_at(step, self.k, self.k_init, self.k_anneal_steps)

    def l1_at(self, step):
        return self.l1_coef * min(1.0, (step + 1) / max(self.l1_warmup, 1))


def schedule(total_tokens, passes, batch_size, warmup_steps=None, decay_frac=0.2,
             k_anneal_frac=0.1):
    """The Schedule's steps: in all, of warm-up, decay and K-annealing; a run shorter than the
    paper's keeps their shares. Every token of data is served `passes` times.
    warmup_steps None: the paper's PAPER_WARMUP, at most 5% of the steps of a run under
    SHORT_RUN tokens (the budget rule's threshold); given, it is used as given."""
    steps = total_tokens * passes // batch_size
    warmup = warmup_steps
    if warmup is None and total_tokens >= SHORT_RUN:
        warmup = PAPER_WARMUP
    elif warmup is None:
        warmup = min(PAPER_WARMUP, round(steps * 0.05))
    return Schedule(steps=steps, warmup=warmup, decay=round(steps * decay_frac),
                    k_anneal_steps=round(steps * k_anneal_frac))


def k_at(step, k, k_init, k_anneal_steps):
    """K-annealing (§3.3.2): linear from k_init down to k over the first k_anneal_steps, then k.
    With k_init = D/2 this is the released code's ceil(max(1, m0 + (1 - m0) t / W) * K)."""
    if step >= k_anneal_steps:
        return k
    return math.ceil(k_init + (k - k_init) * step / k_anneal_steps)


def lr_at(step, total, lr, warmup, decay_steps, lr_end=0.0):
    """Linear warm-up 0 -> lr, constant, then linear decay to lr_end over the last decay_steps."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if step >= total - decay_steps:
        return lr_end + (lr - lr_end) * (total - step) / decay_steps
    return lr


def first_fill(rows, size, place, max_norm_ratio, comms):
    """(rows, outlier norm limit): at least the first `size` rows of a place, as one tensor
    (whole chunks: the buffer keeps the rest as its producer's leftover), and the limit fit on
    exactly those `size` rows of every rank, however the stream is chunked (LM batches or cache
    shards)."""
    first = data.take_rows(rows, size, f"first fill {place}")  # (>= size, C)
    if not torch.isfinite(first).all():
        raise ValueError(f"step 0 (the first buffer fill): NaN or Inf in the activations of site "
                         f"{place}")
    d_model = first.shape[1] // 2 if model.is_transcoder(place[1]) else first.shape[1]
    outlier_norm_limit = data.fit_outlier_norm_limit(first[:size], d_model, max_norm_ratio,
                                                     comms.all_values)
    return first, outlier_norm_limit


def set_norms(saes, rows, outlier_norm_limit, comms, center=False):
    """Every SAE of a place gets its dataset norms (§3.3.3) from the first fill's rows within
    the outlier norm limit, over every rank; center: its biases start at the mean
    (`budget_rule`)."""
    d_model = saes[0].d_model
    x_in, x_out = model.in_out(data.drop_outliers(rows, outlier_norm_limit, d_model), d_model)
    for sae in saes:
        sae.set_norms_(x_in, x_out, comms.mean, center=center)


def step_site(trainers, rows, step, schedule, served):
    """One step of every SAE of a place on the same rows; NaN or Inf in the rows or in a loss
    stops the run, naming the step (the last resumable checkpoint is kept)."""
    if not torch.isfinite(rows).all():
        raise ValueError(f"step {step + 1}: NaN or Inf in the activations of site "
                         f"{trainers[0].place}; stopping (the last resumable checkpoint, if "
                         f"any, is kept)")
    k = schedule.k_at(step)
    lr = schedule.lr_at(step)
    l1_coef = schedule.l1_at(step)
    for trainer in trainers:
        loss = trainer.step(rows, k, lr, l1_coef, served)
        if not math.isfinite(loss):
            raise ValueError(f"step {step + 1}: {trainer.name} loss is {loss} (NaN or Inf); "
                             f"stopping (the last resumable checkpoint, if any, is kept)")


class Trainer:
    """One SAE (this rank's shard of it) with its optimizer and running statistics. sae: the whole
    SAE, sharded here (its init is identical on every rank); its matmuls run in its
    compute_dtype while its weights and Adam's state stay float32."""

    def __init__(self, name, place, sae, comms, adam_betas, batch_norm_mse=False, grad_clip=0.0):
        self.name = name
        self.place = place
        self.comms = comms
        self.batch_norm_mse = batch_norm_mse
        self.grad_clip = grad_clip
        self.sae = comms.shard(sae).to(comms.device)  # keeps sae's compute_dtype
        # lr is set before every step (the schedule); fused: one kernel, ~6x faster on CPU
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=0.0, betas=adam_betas, eps=1e-8,
                                    fused=True)
        self.last_fired = torch.zeros(self.sae.n_features, dtype=torch.long,
                                      device=comms.device)  # rows served when each last fired
        self.running = {"mse": [], "l1": [], "ev": [], "l0": []}  # per step, since the last line

    def step(self, rows, k, lr, l1_coef, served):
        """One Adam step on rows (N, D) or (N, 2D) at K = k; served: rows served so far (for the
        dead count). Returns the loss."""
        x_in, x_out = model.in_out(rows, self.sae.d_model)
        k = min(k, self.sae.n_features * self.comms.tp)  # K-annealing starts at D: maybe > F
        out = self.sae.loss(x_in, x_out, k=k, l1_coef=l1_coef, batch_norm_mse=self.batch_norm_mse)
        self.opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        self.comms.reduce_grads_(self.sae)
        if self.grad_clip > 0:
            self.comms.clip_grad_norm_(self.sae, self.grad_clip)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        self.last_fired[firing_counts(out["f"], self.sae.n_features) > 0] = served
        for key, values in self.running.items():
            values.append(out[key].item())
        return self.running["mse"][-1] + self.running["l1"][-1]

    def summary(self, served):
        """The numbers of a log line, over every rank, and a fresh start for the next: means of
        loss, mse, ev, l0 since the last line, the share of features dead (silent for the last
        DEAD_WINDOW rows served), of those that ever fired and of those that fired in the last
        RECENT_WINDOW rows."""
        mse, ev, l1, l0 = self._running_means()
        for values in self.running.values():
            values.clear()
        dead, fired, recent = self._firing_shares(served)
        return dict(loss=mse + l1, mse=mse, ev=ev, l0=l0, dead=dead, fired=fired, recent=recent)

    def _running_means(self):
        """(mse, ev, l1, l0) since the last line, over every rank: mse and ev are the same within
        a tensor-parallel group and averaged over replicas; l1 and l0 add up over shards."""
        c = self.comms
        means = [sum(self.running[key]) / len(self.running[key])
                 for key in ("mse", "ev", "l1", "l0")]
        ranks = torch.tensor([c.world, c.world, c.dp, c.dp], device=c.device)
        return (c.sum_(torch.tensor(means, device=c.device)) / ranks).tolist()

    def _firing_shares(self, served):
        """(dead, ever fired, fired in the last RECENT_WINDOW rows): shares of all F features
        (every shard), as of the latest replica."""
        c = self.comms
        last_fired = c.sum_(self.last_fired.clone(), c.dp_group, parallel.MAX)  # (F/tp,)
        n_features = self.sae.n_features * c.tp
        dead = c.sum_((served - last_fired >= DEAD_WINDOW).sum(), c.tp_group).item()
        fired = c.sum_((last_fired > 0).sum(), c.tp_group).item()
        now = (last_fired > 0) & (served - last_fired < RECENT_WINDOW)
        recent = c.sum_(now.sum(), c.tp_group).item()
        return dead / n_features, fired / n_features, recent / n_features

    def state_dict(self):
        return {"sae": self.sae.state_dict(), "adam": self.opt.state_dict(),
                "last_fired": self.last_fired}

    def load_state_dict(self, state):
        self.sae.load_state_dict(state["sae"])
        self.last_fired.copy_(state["last_fired"])
        adam = state["adam"]  # a file's dict keys are strings; Adam's state is keyed by index
        adam_state = {int(i): v for i, v in adam["state"].items()}
        self.opt.load_state_dict(dict(adam, state=adam_state))
