"""What a training run will cost and how a scope splits, worked out before any slow work: what a
row costs, how much memory a group of SAEs needs, the groups that fit --max-memory, and the
derived arithmetic train.py prints once.

- `feature_counts`: F of every SAE at each place (--n-features, else --expansion x D).
- `costs`: what making a row costs (every group's LM pass) against the SAE steps it feeds, in
  the reference machine's units (the budget rule); `measure_costs`: those units on the machine
  at hand, timed in a fraction of a second (the time estimate).
- `groups`: the scope split into groups that fit --max-memory, each trained from its own LM pass,
  with the rows each place's buffer gets, the estimated peak memory and the work it does.
- `buffer_rows`: rows per place's buffer: at most --buffer-size, less for a short run.
- `describe_groups`, `describe`: the plan as train.py prints it.
The flag checks are extras/checks.py's; the recipe itself (budget rule, schedule) recipe.py's.
Shapes: D model width, F features, L layer, C row width (D, or 2D for a transcoder).
"""
import ctypes
import dataclasses
import time

import torch

import formats
import model
from buffer import first_fill_rows
from recipe import PAPER_WARMUP
from sae import SAE

GIB = 2 ** 30
# The reference costs (bench.py on 2 CPU cores of the machine this was first written on,
# float32), per million weights a row goes through. The budget rule reads their ratio, so the
# same flags choose the same passes on any machine and a resumed run re-derives them; the time
# estimate measures the machine at hand instead (`measure_costs`).
LM_MS_PER_MWEIGHT = 0.4 / (16 * 3.540096)  # the LM per token: 0.4 ms to SmolLM2's L15
SAE_MS_PER_MWEIGHT = 0.1 / (4608 * 576 / 1e6)  # one SAE step per row: 0.1 ms at D 576, F 4608
LM_OVERHEAD = 1.25  # a forward's time over its block matmuls' (norms, attention, rotary, ...):
#                     SmolLM2's forward to L15 (bench.lm_speed, 30K tokens) against
#                     measure_costs' matmuls, both on 2 CPU cores in float32 (0.0142 against
#                     0.0114 ms per token per million weights)
# Memory beyond what the estimate counts (Python, torch, tokenizer, allocator slack): measured
# as the default run's peak minus its estimate.
RUNTIME_BYTES = int(1.0 * GIB)
MIN_BUFFER_ROWS = 16_384  # fewer rows per buffer mix too few documents: split into groups
def feature_counts(d_model, expansion, n_features=None):
    """F of every SAE to train at each place: n_features (--n-features), else expansion x D."""
    return n_features or [round(e * d_model) for e in expansion]


# ----------------------------------------------------------------------------- cost and memory

def lm_weights(cfg):
    """(weights of one block, weights in all) of a Llama-like model, from its config alone."""
    D = cfg["hidden_size"]
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or D // heads
    kv_heads = cfg.get("num_key_value_heads", heads)
    attention = 2 * D * heads * head_dim + 2 * D * kv_heads * head_dim  # q, o; k, v
    block = attention + 3 * D * cfg["intermediate_size"] + 2 * D  # gate, up, down; two norms
    embed = cfg["vocab_size"] * D * (1 if cfg.get("tie_word_embeddings") else 2)
    return block, embed + cfg["num_hidden_layers"] * block + D


@dataclasses.dataclass
class Costs:
    """ms per million weights a row goes through."""
    lm: float  # the LM forward, per token
    sae: float  # one SAE training step (forward, backward, Adam), per row
    where: str  # what they were measured on


REFERENCE = Costs(LM_MS_PER_MWEIGHT, SAE_MS_PER_MWEIGHT, "the reference machine's")


def lm_mweights(cfg, places):
    """Millions of weights a token goes through in a forward stopped after the deepest place."""
    block, _ = lm_weights(cfg)
    return (max(layer for layer, _ in places) + 1) * block / 1e6


def sae_mweights(cfg, places, widths):
    """Millions of weights a row goes through in one training step of every SAE it feeds."""
    return len(places) * sum(widths) * cfg["hidden_size"] / 1e6


def costs(cfg, groups_of_places, widths, unit=REFERENCE):
    """(LM ms per token, each group's pass to its deepest place summed; ms per row of every SAE
    the rows feed; their ratio): what making a row costs against training on it (the budget
    rule reads the ratio)."""
    lm = sum(lm_mweights(cfg, places) for places in groups_of_places) * unit.lm
    sae = sum(sae_mweights(cfg, places, widths) for places in groups_of_places) * unit.sae
    return lm, sae, lm / sae


def timed_ms(fn, repeat=3):
    """The fastest of `repeat` calls after a warm-up, in ms."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        best = min(best, (time.perf_counter() - started) * 1e3)
    return best


def measure_costs(cfg, device, dtype):
    """Costs on the machine at hand, in a fraction of a second: one block's matmuls at cfg's
    shapes on 256 tokens (x LM_OVERHEAD for the rest of the block), and one step of an 8x SAE
    (sae.py, K 50, Adam) on 256 rows. The random state is left as it was, so that a run plans
    and then trains as one that never planned (the SAEs' initialization must not move)."""
    cuda = [device] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(0)
        return timed_costs(cfg, device, dtype)


def timed_costs(cfg, device, dtype):
    """measure_costs' timing, on whatever random state it is given."""
    D = cfg["hidden_size"]
    block, _ = lm_weights(cfg)
    x = torch.randn(256, D, device=device, dtype=dtype)
    w_in = torch.randn(D, (block - 2 * D) // (2 * D), device=device, dtype=dtype) / D ** 0.5
    w_out = torch.randn(w_in.shape[1], D, device=device, dtype=dtype)

    def forward():  # as many weights as a block (q, k, v, o, gate, up, down), in two matmuls
        (x @ w_in) @ w_out
        sync(device)
    lm_ms = timed_ms(forward) * LM_OVERHEAD / 256 / (block / 1e6)
    sae = SAE(D, 8 * D, k=min(50, 8 * D)).to(device)
    sae.compute_dtype = dtype
    sae.set_norms_(torch.ones(1, D), torch.ones(1, D))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)

    def step():
        x_hat, _ = sae(x)
        opt.zero_grad(set_to_none=True)
        (x_hat - x).pow(2).mean().backward()
        opt.step()
        sync(device)
    sae_ms = timed_ms(step) / 256 / (8 * D * D / 1e6)
    return Costs(lm_ms, sae_ms, f"measured here ({torch.device(device).type}, "
                                f"{str(dtype).replace('torch.', '')})")


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@dataclasses.dataclass
class Memory:
    """The estimated peak bytes of training a group of places x widths from one LM pass."""
    cfg: dict  # the model's config
    widths: list  # F of each SAE at a place
    batch: int  # rows per step
    lm_batch: int  # documents per LM forward
    context: int  # tokens per document
    dtype_bytes: int  # the LM's and the buffers' precision

    def bytes(self, places, rows):
        """With `rows` per buffer: the LM's weights and one forward with what it captures at
        every place (B x T rows each), every SAE's weights, gradients and two Adam moments
        (float32), the widest step's (N, F) scores, and the buffers: each place's rows, as many
        again queued for it while the others fill (FanOut), and a refill's copies."""
        D = self.cfg["hidden_size"]
        row = {place: (2 if model.is_transcoder(place[1]) else 1) * D for place in places}  # C
        forward = 6 * D + 3 * self.cfg["intermediate_size"] + sum(row.values())
        fixed = RUNTIME_BYTES + lm_weights(self.cfg)[1] * self.dtype_bytes
        fixed += self.lm_batch * self.context * forward * self.dtype_bytes
        saes = len(places) * sum(4 * 4 * (2 * F * D + F + D) for F in self.widths)
        step = 3 * self.batch * max(self.widths) * 4
        buffers = rows * self.dtype_bytes * (2 * sum(row.values()) + 2 * max(row.values()))
        return fixed + saes + step + buffers

    def rows_that_fit(self, places, max_bytes):
        """The most buffer rows per place a group can have within max_bytes."""
        fixed = self.bytes(places, 0)
        return int((max_bytes - fixed) // (self.bytes(places, 1) - fixed))


@dataclasses.dataclass
class GroupPlan:
    """A group of places trained together from one LM pass."""
    places: list  # (layer, site) pairs, in the order given (the SAEs' init order)
    rows: int  # per buffer
    bytes: int = None  # estimated peak memory (None: no LM config to estimate from)
    lm_work: float = 0.0  # tokens x millions of weights each goes through, for the LM
    sae_work: float = 0.0  # rows served x millions of weights, for every SAE's steps

    def minutes(self, unit):
        """The estimated time at costs `unit`: the LM pass (with the held-out check) and the
        SAE steps; the check's SAE forwards and the first fill's wait are not counted."""
        return (self.lm_work * unit.lm + self.sae_work * unit.sae) / 6e4


def groups(cfg, places, args, steps, batch, dtype_bytes):
    """The run split into groups trained one after another, each from its own LM pass, so that
    each fits --max-memory: [GroupPlan]. A group's buffers keep at least MIN_BUFFER_ROWS rows
    (or all a short run uses). From --activations (no LM config): one group with the rows
    --buffer-size allows."""
    wanted = buffer_rows(args.buffer_size, batch, steps, args.passes)
    if not cfg.get("vocab_size"):
        return [GroupPlan(places, wanted)]
    widths = feature_counts(cfg["hidden_size"], args.expansion, args.n_features)
    memory = Memory(cfg, widths, batch, args.lm_batch_size, args.context_size, dtype_bytes)
    max_bytes = args.max_memory * GIB
    least = min(wanted, MIN_BUFFER_ROWS)
    # 1. in layer order (a group's forward then stops early), every place must fit alone
    in_layer_order = sorted(places, key=lambda place: (place[0], model.SITES.index(place[1])))
    for place in in_layer_order:
        need = memory.bytes([place], least)
        if need > max_bytes:
            raise ValueError(f"--max-memory {args.max_memory:g} is too small for even one "
                             f"SAE: {formats.place_name(place)} needs {need / GIB:.1f} GiB with "
                             f"{least:,} buffer rows")
    # 2. each group as large as fits, in layer order
    split = [[]]
    for place in in_layer_order:
        if split[-1] and memory.bytes(split[-1] + [place], least) > max_bytes:
            split.append([])
        split[-1].append(place)
    # 3. as many groups, even in size, where every one of them still fits
    n = len(split)
    even = [in_layer_order[len(places) * i // n:len(places) * (i + 1) // n] for i in range(n)]
    if all(memory.bytes(group, least) <= max_bytes for group in even):
        split = even
    # 4. each group in the order given, its buffers as large as memory allows
    return [plan_group([p for p in places if p in group], memory, wanted, args, steps)
            for group in split]


def plan_group(places, memory, wanted, args, steps):
    """The GroupPlan of places: buffer rows (at most wanted), peak memory, work."""
    rows = min(wanted, memory.rows_that_fit(places, args.max_memory * GIB))
    lm_tokens = args.total_tokens + args.eval_tokens  # the LM also runs the held-out check
    lm_work = lm_tokens * lm_mweights(memory.cfg, places)
    sae_work = steps * args.batch_size * sae_mweights(memory.cfg, places, memory.widths)
    return GroupPlan(places, rows, memory.bytes(places, rows), lm_work, sae_work)


def buffer_rows(buffer_size, batch, steps, passes):
    """Rows per place's buffer: a run shorter than --buffer-size fills only what it will use
    (never less than two per-rank batches); its first fill's use counts are staggered over
    1..passes (buffer.py)."""
    return min(buffer_size, max(2 * batch, first_fill_rows(steps * batch, passes)))


# ----------------------------------------------------------------------------- what is printed

def describe_groups(plans, args, cfg, dtype):
    """The plan of a scope as printed before the first fill: per group its places, buffer rows,
    estimated peak memory and time on this machine (`measure_costs`), and the totals."""
    n_places = sum(len(plan.places) for plan in plans)
    lines = [f"plan: {n_places} site(s) in {len(plans)} group(s) under --max-memory "
             f"{args.max_memory:g} GiB, each group one LM pass:"]
    unit = REFERENCE
    if plans[0].bytes is not None:  # an LM's config to time its shapes with
        unit = measure_costs(cfg, args.device, dtype)
    for i, plan in enumerate(plans):
        names = [formats.place_name(place) for place in plan.places]
        shown = ", ".join(names) if len(names) <= 6 else f"{names[0]} ... {names[-1]}"
        estimate = ""
        if plan.bytes is not None:
            estimate = f"; ~{plan.bytes / GIB:.1f} GiB, ~{plan.minutes(unit):.0f} min"
        lines.append(f"  group {i}: {len(names)} site(s) {shown}; {plan.rows:,} buffer rows "
                     f"per site{estimate}")
    if plans[0].bytes is not None:
        hours = sum(plan.minutes(unit) for plan in plans) / 60
        peak = max(plan.bytes for plan in plans) / GIB
        lines.append(f"  in all ~{hours:.1f} h, peak ~{peak:.1f} GiB (time at the costs "
                     f"{unit.where}: LM {unit.lm:.4f} ms per token, SAE step {unit.sae:.4f} ms "
                     f"per row, per million weights)")
    return "\n".join(lines)


def describe(args, schedule, trainers, comms):
    """The derived arithmetic of one group, as printed once: SAEs, steps, the budget rule, the
    schedule and the parallel layout. args: train.py's flags; trainers: the group's."""
    steps = schedule.steps
    tokens = steps * args.batch_size
    names = ", ".join(trainer.name for trainer in trainers)
    warmup = "as given"
    if args.warmup_steps is None:
        warmup = f"the paper's {PAPER_WARMUP}, at most 5% of a short run"
    text = (f"{len(trainers)} SAE(s): {names} | D {trainers[0].sae.d_model} | "
            f"{steps:,} steps x {args.batch_size} tokens = {tokens:,} tokens "
            f"each ({args.passes} pass(es) over {tokens // args.passes:,} tokens)\n{args.rule}"
            f"\nschedule: warm-up {schedule.warmup} steps ({warmup}) | K {schedule.k_init} -> "
            f"{args.k} over {schedule.k_anneal_steps} steps | lr {args.lr:g}, decay to "
            f"{args.lr_end:g} over the last {schedule.decay} steps")
    if args.act == "vanilla":
        text += f" | L1 {args.l1_coef:g} warmed up over {schedule.l1_warmup} steps"
    if comms.world > 1:
        widest = max(trainer.sae.n_features for trainer in trainers)
        per_rank = trainers[0].sae.d_model * widest
        text += (f"\nparallel: {comms.world} ranks = dp {comms.dp} x tp {comms.tp}; "
                 f"{args.batch_size // comms.world} rows per rank per step, {per_rank:,} of "
                 f"each SAE's weights per matrix per rank")
    return text


def return_freed_memory(places):
    """Serve blocks over 1 MiB by mmap (glibc's M_MMAP_THRESHOLD), so freeing them returns them
    to the system. By default glibc raises that threshold to the largest block freed, after
    which a scope's many same-sized row tensors (buffers, queued LM batches) fragment the heap:
    40 sites kept ~1.2 GB more after their first refill. Only for several places: every step's
    and every forward's temporaries over 1 MiB then come as fresh pages, which made the default
    one-site run's steps 1.5x slower (320K rows in 68 s against 45 s). A no-op without glibc."""
    if places < 2:
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass
