"""The training recipe of §3.3.2, and one SAE with its optimizer (`Trainer`).

- `budget_rule`: the paper's recipe (2048 tokens per step, each row once, biases at 0) at paper
  scale; a short run serves each LM row several times, takes smaller batches and starts its
  biases at the data mean.
- `schedule`, `lr_at`, `k_at`: linear warm-up, constant lr, linear decay over the last 20% of
  steps; K annealed linearly from D down to K over the first 10% of steps.
- `Trainer`: one SAE (this rank's shard of it), its Adam optimizer, one step, and the running
  statistics of its log line (loss, EV, L0, dead share over the last 100K tokens, §4.4).
The SAE's math is sae.py's, distribution parallel.py's; train.py runs the loop.
Shapes: N rows, D model width, F features, K active.
"""
import math

import torch

import data
import model
import parallel

PAPER_WARMUP = 10_000  # steps of linear lr warm-up (§3.3.2; released: 5000)
SHORT_RUN = 50_000_000  # tokens per SAE: a shorter run reuses its rows (the paper: 800M, 1.6B)
MAX_PASSES = 8  # a short run serves each LM row up to this many times
STEPS_PER_BATCH_SIZE = 16_384  # batch <= rows served / this, within 256..2048
DEAD_WINDOW = 100_000  # rows served: a feature that has not fired within this many is counted
                      # dead (§4.4)


def budget_rule(total_tokens, passes=None, batch_size=None, init_bias=None, cost_ratio=None):
    """(passes, batch_size, init_bias, the rule as printed) for total_tokens of data per SAE;
    what is given (not None) is kept.

    The paper's recipe (2048 tokens per step, each row once) is for 390K steps. A short run with
    it makes a few hundred steps, most of them in warm-up, K-annealing and decay, and leaves
    features dead. So a run under SHORT_RUN tokens serves each row several times (the buffer
    keeps a row until it has been served that often) when rows are dear: cost_ratio is what
    making a row costs (the LM forward to the deepest site) against training every SAE it feeds
    on it (plan.costs; on 2 CPU cores ~0.4 ms per token to layer 15 against ~0.1 ms per row of
    one 8x SAE there: 4). A row is served up to 2 x cost_ratio times, at most MAX_PASSES: then
    making rows takes at most a third of the time, and a scope of many SAEs on one forward, where
    rows are cheap, takes fresh rows instead. None (a single --activations file, which names no
    LM, read for epochs if it is shorter): the token budget alone decides; a cache's rows count
    as its LM's. The batch shrinks toward 16K steps:
    the largest power of two <= rows served / 16384, within 256..2048 (the floor keeps the
    per-step overhead small on CPU). A short run also starts its biases at the data mean
    (`SAE.set_norms_`): with few steps, features that all read the same large mean at step 0
    lose TopK for good (docs/choices.md). At paper scale this is the paper's recipe, biases at 0
    included."""
    chosen, dear = {}, "" if cost_ratio is None else f", and up to 2x what a row costs " \
        f"against the SAE steps it feeds (here {cost_ratio:.2g}x)"
    if passes is None:
        passes = min(MAX_PASSES, max(1, SHORT_RUN // max(total_tokens, 1)))
        if cost_ratio is not None:
            passes = min(passes, max(1, int(2 * cost_ratio)))
        chosen["passes"] = passes
    if batch_size is None:
        per_step = max(1, total_tokens * passes // STEPS_PER_BATCH_SIZE)
        batch_size = chosen["batch size"] = min(2048, max(256, 2 ** int(math.log2(per_step))))
    if init_bias is None:
        init_bias = chosen["init bias"] = "mean" if total_tokens < SHORT_RUN else "zero"
    if not chosen:
        return passes, batch_size, init_bias, "as given"
    rule = (f"budget rule for {total_tokens:,} tokens: "
            + ", ".join(f"{name} {value}" for name, value in chosen.items())
            + f" (runs under {SHORT_RUN // 1_000_000}M tokens serve each row up to "
              f"{MAX_PASSES}x{dear}, and start their biases at the mean; batch = rows served / "
              f"{STEPS_PER_BATCH_SIZE}, 256..2048)")
    return passes, batch_size, init_bias, rule


def schedule(total_tokens, passes, batch_size, warmup_steps, decay_frac, k_anneal_frac,
             l1_warmup_frac=0.0):
    """Steps in all and of warm-up, decay, K-annealing and the Vanilla L1 warm-up; a run shorter
    than the paper's keeps their shares. Every token of data is served `passes` times.
    warmup_steps None: the paper's PAPER_WARMUP, at most 5% of the steps of a run under SHORT_RUN
    tokens (the budget rule's threshold); given, it is used as given."""
    steps = total_tokens * passes // batch_size
    warmup = warmup_steps
    if warmup is None:
        warmup = PAPER_WARMUP if total_tokens >= SHORT_RUN else \
            min(PAPER_WARMUP, round(steps * 0.05))
    return dict(steps=steps, warmup=warmup, decay=round(steps * decay_frac),
                k_anneal_steps=round(steps * k_anneal_frac),
                l1_warmup=round(steps * l1_warmup_frac))


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


def first_fill(rows, size, key, d_model, max_norm_ratio, saes, comms, center=False):
    """Exactly the first `size` rows of site key (however the stream is chunked: LM batches or
    cache shards) set its massive-activation limit and the SAEs' dataset norms (§3.3.3), both
    over every rank's rows; center: biases start at the mean (`budget_rule`). Returns the rows
    for the buffer and the limit."""
    first = data.take_rows(rows, size, f"first fill {key}")  # (>= size, C): whole chunks
    if not torch.isfinite(first).all():
        raise ValueError(f"step 0 (the first buffer fill): NaN or Inf in the activations of site "
                         f"{key}")
    outlier_norm_limit = data.outlier_norm_limit(first[:size], d_model, max_norm_ratio,
                                                 comms.all_values)
    sample = model.in_out(data.keep_rows(first[:size], outlier_norm_limit, d_model), d_model)
    for sae in saes:
        sae.set_norms_(*sample, comms.mean, center=center)
    # one tensor, all of the first fill (whole chunks): the buffer takes `size` rows and keeps
    # the rest pending, so the pending rows are saved with a resumable state
    return [data.keep_rows(first, outlier_norm_limit, d_model)], outlier_norm_limit


def step_site(trainers, rows, step, k, lr, served, l1_coef=0.0):
    """One step of every SAE of a site on the same rows; NaN or Inf in the rows or in a loss
    stops the run, naming the step (the last resumable checkpoint is kept)."""
    if not torch.isfinite(rows).all():
        raise ValueError(f"step {step + 1}: NaN or Inf in the activations of site "
                         f"{trainers[0].key}; stopping (the last resumable checkpoint, if any, "
                         f"is kept)")
    for trainer in trainers:
        loss = trainer.step(rows, k, lr, served, l1_coef)
        if not math.isfinite(loss):
            raise ValueError(f"step {step + 1}: {trainer.name} loss is {loss} (NaN or Inf); "
                             f"stopping (the last resumable checkpoint, if any, is kept)")


class Trainer:
    """One SAE (this rank's shard of it) with its optimizer and running statistics. sae: the whole
    SAE, sharded here (its init is identical on every rank); its matmuls run in compute_dtype
    while its weights and Adam's state stay float32."""

    def __init__(self, name, key, sae, comms, compute_dtype, lr, betas, batch_norm_mse=False,
                 grad_clip=0.0):
        self.name, self.key, self.comms = name, key, comms
        self.batch_norm_mse, self.grad_clip = batch_norm_mse, grad_clip
        self.sae = comms.shard(sae).to(comms.device)
        self.sae.compute_dtype = compute_dtype
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=lr, betas=betas, eps=1e-8,
                                    fused=True)  # one kernel: ~6x faster on CPU
        self.last_fired = torch.zeros(self.sae.n_features, dtype=torch.long,
                                      device=comms.device)  # rows served when each last fired
        self.log = {}

    def step(self, rows, k, lr, served, l1_coef=0.0):
        """One Adam step on rows (N, D) or (N, 2D) at K = k; served: rows served so far (for the
        dead count). Returns the loss."""
        out = self.sae.loss(*model.in_out(rows, self.sae.d_model),
                            k=min(k, self.sae.n_features * self.comms.tp), l1_coef=l1_coef,
                            batch_norm_mse=self.batch_norm_mse)
        self.opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        self.comms.reduce_grads_(self.sae)
        if self.grad_clip > 0:
            self.comms.clip_grad_norm_(self.sae, self.grad_clip)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        self.last_fired[out["fired"]] = served
        for key in ("mse", "l1", "ev", "l0"):  # kept per step until the next log line
            self.log.setdefault(key, []).append(out[key].item())
        return self.log["mse"][-1] + self.log["l1"][-1]

    def log_line(self, served):
        """Means since the last line, over every rank: mse and ev are the same within a
        tensor-parallel group and averaged over replicas; l1 and l0 add up over shards."""
        c = self.comms
        means = torch.tensor([sum(self.log[k]) / len(self.log[k])
                              for k in ("mse", "ev", "l1", "l0")], device=c.device)
        mse, ev, l1, l0 = (c.sum_(means) / torch.tensor([c.world, c.world, c.dp, c.dp],
                                                        device=c.device)).tolist()
        self.log = {}
        fired = c.sum_(self.last_fired.clone(), c.dp_group, parallel.MAX)  # latest replica
        dead, ever = (c.sum_(x.sum(), c.tp_group).item() / (self.sae.n_features * c.tp)
                      for x in (served - fired >= DEAD_WINDOW, fired > 0))
        self.logged = dict(loss=mse + l1, mse=mse, ev=ev, l0=l0, dead=dead,
                           fired=ever)  # for the logger; fired: the share that ever fired
        return f"loss {mse + l1:.4f} | ev {ev:.3f} | l0 {l0:.1f} | dead {100 * dead:.1f}%"

    def state_dict(self):
        return {"sae": self.sae.state_dict(), "adam": self.opt.state_dict(),
                "last_fired": self.last_fired}

    def load_state_dict(self, state):
        self.sae.load_state_dict(state["sae"])
        self.last_fired.copy_(state["last_fired"])
        adam = state["adam"]  # a file's dict keys are strings; Adam's state is keyed by index
        self.opt.load_state_dict(dict(adam, state={int(i): v for i, v in adam["state"].items()}))
