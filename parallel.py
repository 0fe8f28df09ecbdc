"""Mixed data/tensor parallelism over torch.distributed (App. A.2).

    torchrun --nproc_per_node=8 train.py --layer 15 --site R --expansion 128 --tp 2   # dp 4 x tp 2

World = dp x tp ranks; a tensor-parallel group is tp neighbouring ranks (one node, fast links).
Every rank runs its own LM copy on its own documents into its own buffer. The SAE is split along
F in a tensor-parallel group (encoder rows and bias, decoder rows; the decoder bias and a skip
transcoder's W_skip replicated). Each step the group all-gathers its ranks' minibatches, then:

1. every shard scores its F/tp features and keeps its local top K; the global top K of eq. 5 is
   contained in the union of the local ones, so the ranks all-gather only those (N, tp*K) scores,
   pick the same global K, and each keeps its winners: exact, with no (N, F) matrix gathered;
2. each shard decodes its winners (sae.py's sparse path) into a partial (N, D), all-reduced;
3. the loss is now the same on every rank of the group; gradients of sharded weights are averaged
   over the data-parallel replicas, those of the replicated ones over the world.

One process (no torchrun) gets the same object with every collective a no-op. The SAE math is
sae.py's, through its `select` and `reduce` hooks.
"""
import os

import torch
import torch.distributed as dist

from sae import SAE

MAX = dist.ReduceOp.MAX
REPLICATED = ("b_dec", "W_skip")  # the same on every shard of a tensor-parallel group


def _like(sae, n_features):
    """A new SAE with sae's settings and n_features features (weights still to be filled)."""
    like = SAE(sae.d_model, n_features, sae.act, sae.k, sae.transcoder,
               init_decoder_norm=sae.init_decoder_norm, threshold=sae.threshold, skip=sae.skip)
    like.compute_dtype = sae.compute_dtype
    return like


class AllReduceSum(torch.autograd.Function):
    """Sum the decoders' partial outputs over the group. Every rank then computes the same loss
    from the same sum, so the gradient reaching each partial is that of the sum: identity."""

    @staticmethod
    def forward(ctx, partial, group):
        partial = partial.clone()
        dist.all_reduce(partial, group=group)
        return partial

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class Comms:
    """Where this process sits and the few collectives training needs (no-ops for one rank)."""

    def __init__(self, tp=1, device="cpu"):
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        if tp < 1 or self.world % tp:
            raise ValueError(f"--tp {tp} must divide the number of processes ({self.world}); "
                             f"launch tp x dp processes with torchrun --nproc_per_node=N")
        self.tp = tp
        self.dp = self.world // tp
        self.tp_rank = self.rank % tp  # rank r is tensor-parallel rank r % tp ...
        self.dp_rank = self.rank // tp  # ... of data-parallel replica r // tp
        self.device = device
        self.tp_group = None  # this rank's tensor-parallel group (None: the world of one)
        self.dp_group = None  # the ranks holding the same shard in the other replicas
        if self.world > 1:
            if device.startswith("cuda"):  # one GPU per process
                self.device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.startswith("cuda") else "gloo")
            for d in range(self.dp):  # every rank must create every group, in the same order
                g = dist.new_group([d * tp + t for t in range(tp)])
                self.tp_group = g if d == self.dp_rank else self.tp_group
            for t in range(tp):
                g = dist.new_group([d * tp + t for d in range(self.dp)])
                self.dp_group = g if t == self.tp_rank else self.dp_group

    def print0(self, *args, **kwargs):  # only rank 0 prints
        if self.rank == 0:
            print(*args, **kwargs)

    def shard_path(self, path):
        """Each rank's own file (resumable checkpoints): out/resume.rank3.safetensors."""
        stem, ext = os.path.splitext(path)
        return path if self.world == 1 else f"{stem}.rank{self.rank}{ext}"

    # ------------------------------------------------------------------------- data
    def gather_rows(self, rows):
        """(n, C) per rank -> (tp * n, C), the same on every rank of the tensor-parallel group."""
        if self.tp == 1:
            return rows
        parts = [torch.empty_like(rows) for _ in range(self.tp)]
        dist.all_gather(parts, rows.contiguous(), group=self.tp_group)
        return torch.cat(parts)

    def all_values(self, x):
        """(n,) per rank -> (world * n,): every rank's values, e.g. token norms for a median."""
        if self.world == 1:
            return x
        x = x.to(self.device)
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    def mean(self, x):
        """Mean over the rows of every rank's x (N, ...), whatever each rank's N."""
        x = x.to(self.device)
        total = torch.cat([x.double().sum(0).reshape(-1),
                           torch.tensor([len(x)], dtype=torch.float64, device=x.device)])
        self.sum_(total)
        return (total[:-1] / total[-1]).reshape(x.shape[1:]).to(x.dtype)

    def sum_(self, x, group=None, op=None):
        """In-place all-reduce (sum, or op) over the world or a group."""
        if self.world > 1:
            dist.all_reduce(x, op=op or dist.ReduceOp.SUM, group=group)
        return x

    # ------------------------------------------------------------------------- SAE
    def shard(self, sae):
        """This rank's slice of a full SAE (F/tp features), wired to the others."""
        if self.tp == 1:
            return sae
        F = sae.n_features // self.tp
        part = slice(self.tp_rank * F, (self.tp_rank + 1) * F)
        shard = _like(sae, F)
        with torch.no_grad():
            for name, p in shard.named_parameters():
                full = getattr(sae, name)
                p.copy_(full if name in REPLICATED else full[part])
            shard.norm_in.copy_(sae.norm_in)
            shard.norm_out.copy_(sae.norm_out)
        shard.select = self.sharded_topk
        shard.reduce = self.sum_shards
        return shard.to(sae.W_enc.device, sae.W_enc.dtype)

    def sharded_topk(self, score, k):
        """Exact global top K of eq. 5 from local scores (N, F/tp): local (values, indices), each
        (N, K'), K' = min(K, F/tp) (K-annealing starts at D, maybe over F/tp), 0 for the entries
        that lost to other shards: the global top K is within the union of the shards' offers."""
        mine = min(k, score.shape[-1])
        top, idx = score.topk(mine, dim=-1, sorted=False)  # (N, K')
        every = self.gather_rows(top.T).T  # (N, tp*K'): all shards' candidates, rank order
        won = torch.zeros_like(every, dtype=torch.bool)
        won.scatter_(1, every.topk(k, dim=-1, sorted=False).indices, True)
        return top * won[:, self.tp_rank * mine:(self.tp_rank + 1) * mine], idx

    def sum_shards(self, partial):
        """The decoded sum (N, D) over the shards' partial sums."""
        return AllReduceSum.apply(partial, self.tp_group)

    def reduce_grads_(self, sae):
        """Average gradients over data-parallel replicas; the replicated weights (decoder bias,
        W_skip) over the world (their gradient is the same within a tensor-parallel group)."""
        if self.world == 1:
            return
        for name, p in sae.named_parameters():
            replicated = name in REPLICATED
            self.sum_(p.grad, None if replicated else self.dp_group)
            p.grad /= self.world if replicated else self.dp

    def clip_grad_norm_(self, sae, max_norm):
        """Global grad norm over the whole (unsharded) SAE, then scale."""
        params = dict(sae.named_parameters())
        sq = sum(p.grad.double().pow(2).sum() for n, p in params.items() if n not in REPLICATED)
        sq = self.sum_(sq, self.tp_group)
        sq = sq + sum(params[n].grad.double().pow(2).sum() for n in REPLICATED if n in params)
        scale = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
        for p in sae.parameters():
            p.grad.mul_(scale.to(p.grad.dtype))

    def gather_sae(self, shard):
        """Rank 0: the whole SAE, gathered from every shard; other ranks: None. Replicas are
        equal, so only data-parallel replica 0's tensor-parallel group sends."""
        if self.tp == 1:
            return shard if self.rank == 0 else None
        full = None
        if self.rank == 0:
            full = _like(shard, shard.n_features * self.tp).to(shard.W_enc.device,
                                                               shard.W_enc.dtype)
            whole = {n: getattr(shard, n) for n in ("norm_in", "norm_out", *REPLICATED)}
            full.load_state_dict({n: t for n, t in whole.items() if t is not None}, strict=False)
        if self.dp_rank == 0:
            for name, p in shard.named_parameters():
                if name in REPLICATED:
                    continue
                parts = [torch.empty_like(p) for _ in range(self.tp)] if full is not None else None
                dist.gather(p.detach().contiguous(), parts, dst=0, group=self.tp_group)
                if full is not None:
                    getattr(full, name).data.copy_(torch.cat(parts))
        return full

    def close(self):
        if self.world > 1:
            dist.barrier()
            dist.destroy_process_group()
