"""The Llama Scope sparse autoencoder (§2.1-2.4, §3.3.1, §3.3.3): TopK (eq. 5), Vanilla (§4.2).

    h = ReLU(W_enc x + b_enc);  keep the K largest h_i * ||W_dec[i]||;  x_hat = W_dec^T f + b_dec

The math only: the schedules are recipe.py's, folding and JumpReLU inference.py's, sharding
parallel.py's, files formats.py's. Shapes: N rows, D model width, F features, K active.
"""
import math

import torch
import torch.nn.functional as F


class TopKEncode(torch.autograd.Function):
    """(values, indices), each (N, K): the K features with the largest h_i * s_i,
    h = ReLU(W_enc x + b_enc) and s_i the rank scale (the decoder norm). Same result as
    `SAE.forward_dense`, but the backward touches only the N*K selected entries: no (N, F) gradient
    is ever made (2*N*K*D flops, not 2*N*F*D). Scaling the encoder rows by s > 0 before the matmul
    ranks h_i * s_i without an (N, F) multiply."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, scale, k, select):
        score = torch.addmm(b_enc * scale, x, (W_enc * scale[:, None]).T)  # (N, F) = h_i * s_i
        top, idx = select(score, k)  # (N, K); ReLU is monotone: select first
        vals = (top / scale[idx]).clamp_(min=0)  # (N, K): h_i, kept unscaled (eq. 5)
        ctx.save_for_backward(x, idx, vals)
        ctx.n_features = W_enc.shape[0]
        return vals, idx

    @staticmethod
    def backward(ctx, grad_vals, grad_idx):
        x, idx, vals = ctx.saved_tensors
        g = grad_vals * (vals > 0)  # (N, K): ReLU'
        # grad W_enc[i] = sum of g_nk x_n over the (n, k) where feature i is active: the same form
        # as the gradient embedding_bag gives its weight, so its fused CPU/GPU kernel computes it
        # (about 2x faster than a sparse COO matmul here); x takes the place of the output
        # gradient.
        with torch.enable_grad():
            W = torch.zeros(ctx.n_features, x.shape[1], device=x.device, dtype=g.dtype,
                            requires_grad=True)  # g: the values' dtype (bf16 x, fp32 weights)
            out = F.embedding_bag(idx, W, per_sample_weights=g, mode="sum")
            grad_W, = torch.autograd.grad(out, W, grad_outputs=x.to(g.dtype))  # (F, D)
        grad_b = torch.zeros(ctx.n_features, device=x.device, dtype=g.dtype)
        grad_b.index_add_(0, idx.flatten(), g.flatten())  # (F,)
        return None, grad_W, grad_b, None, None, None


def local_topk(score, k):
    """The selection of eq. 5 on one device. parallel.py swaps in an exact sharded one, which
    returns 0 in place of the entries that lost to another shard's features."""
    return score.topk(k, dim=-1, sorted=False)


class SAE(torch.nn.Module):
    """TopK:    h = ReLU(W_enc x + b_enc); keep the K largest h_i * ||W_dec[i]||, f = h there,
                0 elsewhere
       Vanilla: f = ReLU(W_enc x + b_enc), loss adds l1_coef * sum_i f_i * ||W_dec[i]||
       x_hat = W_dec^T f + b_dec, trained on normalized data: x * S_in in, target * S_out out.

    W_enc (F, D), b_enc (F), W_dec (F, D), b_dec (D). W_dec is stored with one ROW per feature (the
    paper's column W_dec[:, i]) so the sparse decoder gathers contiguous rows; checkpoints use the
    released (D, F) layout. Decoder norms are never renormalized during training: they enter the
    ranking instead (§2.4). A transcoder is the same map with a target other than its input.
    S_in = sqrt(D) / E||x_in||, S_out = sqrt(D) / E||x_out|| (§3.3.3): one scalar each, kept as
    the dataset average norms `norm_in`, `norm_out` (0 until `set_norms_` sees data).
    `compute_dtype` (e.g. bfloat16, the paper's GPU precision): the matmuls run in it (autocast)
    while the parameters, their gradients and Adam's state keep their own dtype (float32). Pure
    bf16 parameters would round away any update below ~2^-9 of a weight (docs/precision.md)."""

    def __init__(self, d_model, n_features, act="topk", k=50, transcoder=False,
                 init_decoder_norm=None, rank_by_decoder_norm=True, threshold=None):
        super().__init__()
        assert act in ("topk", "vanilla", "jumprelu")
        self.d_model, self.n_features, self.act, self.k = d_model, n_features, act, k
        self.threshold = threshold  # JumpReLU (inference.py): f_i = h_i if h_i > theta
        self.transcoder, self.rank_by_decoder_norm = transcoder, rank_by_decoder_norm
        self.W_enc = torch.nn.Parameter(torch.empty(n_features, d_model))
        self.b_enc = torch.nn.Parameter(torch.zeros(n_features))
        self.W_dec = torch.nn.Parameter(torch.empty(n_features, d_model))
        self.b_dec = torch.nn.Parameter(torch.zeros(d_model))
        self.register_buffer("norm_in", torch.zeros(()))
        self.register_buffer("norm_out", torch.zeros(()))
        # how a shard of F joins the others (parallel.py); one device: plain TopK, no reduction
        self.select, self.reduce = local_topk, lambda partial: partial
        self.compute_dtype = None  # None: the parameters' dtype
        self.init_decoder_norm = init_decoder_norm or math.sqrt(2 * d_model / n_features)
        self.init_(self.init_decoder_norm)

    @torch.no_grad()
    def init_(self, norm):
        """§3.3.1: Kaiming-uniform decoder columns rescaled to 2-norm `norm`; encoder = decoder
        transpose (then untied). Transcoders: an independent encoder, rows of the same norm."""
        for w in (self.W_dec, self.W_enc):
            torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            w.mul_(norm / w.norm(dim=1, keepdim=True))
        if not self.transcoder:
            self.W_enc.copy_(self.W_dec)
        self.b_enc.zero_()
        self.b_dec.zero_()

    @torch.no_grad()
    def set_norms_(self, x_in, x_out, mean=lambda x: x.mean(0), center=False):
        """Dataset-wise normalization from a sample of rows (the first buffer fill); `mean` over
        every rank's rows in parallel.py. center: also start b_dec at the mean target and b_enc
        at -W_enc S_in E[x_in], so every feature starts reading x - E[x] (the authors' library's
        `bias_init_method`; the paper starts both biases at 0)."""
        self.norm_in.fill_(mean(x_in.float().norm(dim=-1)))
        self.norm_out.fill_(mean(x_out.float().norm(dim=-1)))
        if center:
            s_in, s_out = self.scales()
            mu_in, mu_out = (mean(x.float()).to(self.b_dec) for x in (x_in, x_out))  # (D,)
            self.b_dec.copy_(mu_out * s_out)
            self.b_enc.copy_(-self.W_enc @ (mu_in * s_in))

    def scales(self):
        """(S_in, S_out): multiply raw activations by these to get the SAE's training space."""
        return math.sqrt(self.d_model) / self.norm_in, math.sqrt(self.d_model) / self.norm_out

    def rank_scale(self):
        """(F,) what multiplies h_i in the TopK ranking: ||W_dec[i]||, detached (eq. 5)."""
        if not self.rank_by_decoder_norm:
            return torch.ones(self.n_features, device=self.W_dec.device, dtype=self.W_dec.dtype)
        return self.W_dec.detach().norm(dim=1)

    def autocast(self):
        """The context the SAE's matmuls run in: compute_dtype, or as they are."""
        dtype = self.compute_dtype or self.W_enc.dtype
        return torch.autocast(self.W_enc.device.type, dtype, enabled=dtype != self.W_enc.dtype)

    def pre_acts(self, x, full=False):
        """(N, F) W_enc x + b_enc, in the compute dtype; full: in the weights' (float32), as
        JumpReLU's theta is fit and applied: bf16 values tie, and a tie at theta flips whole."""
        if full:
            return F.linear(x.to(self.W_enc), self.W_enc, self.b_enc)
        with self.autocast():
            return F.linear(x, self.W_enc, self.b_enc)

    def encode(self, x, k=None):
        """(values, indices), each (N, K), for TopK; dense f (N, F) for Vanilla and JumpReLU."""
        if self.act == "vanilla":
            return F.relu(self.pre_acts(x))
        if self.act == "jumprelu":
            h = self.pre_acts(x, full=True)
            return h * (h > self.threshold)
        with self.autocast():  # the (N, F) scores in compute_dtype, the K values back in fp32
            return TopKEncode.apply(x, self.W_enc, self.b_enc, self.rank_scale(), k or self.k,
                                    self.select)

    def decode(self, f):
        """x_hat (N, D) from (values, indices) or from dense f (N, F)."""
        if isinstance(f, tuple):
            vals, idx = f  # only the K active rows of W_dec are read (and get gradient)
            partial = F.embedding_bag(idx, self.W_dec, per_sample_weights=vals, mode="sum")
        else:
            with self.autocast():
                partial = f @ self.W_dec  # (N, D)
        return self.reduce(partial) + self.b_dec

    def forward(self, x, k=None):
        """x (N, D) in training space -> (x_hat (N, D), f)."""
        f = self.encode(x, k)
        return self.decode(f), f

    def forward_dense(self, x, k=None):
        """Reference TopK, eq. 5 spelled out densely: the tests check `forward` against it."""
        with self.autocast():
            h = F.relu(self.pre_acts(x))  # (N, F)
            idx = (h * self.rank_scale()).topk(k or self.k, dim=-1).indices  # (N, K)
            f = torch.zeros_like(h).scatter(1, idx, h.gather(1, idx))  # (N, F), K nonzeros
            return f @ self.W_dec + self.b_dec, f

    def loss(self, x_in, x_out, k=None, l1_coef=0.0, batch_norm_mse=False):
        """Loss and metrics for one minibatch of RAW activations (N, D) each."""
        s_in, s_out = self.scales()
        x, y = x_in.to(self.W_enc.dtype) * s_in, x_out.to(self.W_enc.dtype) * s_out
        x_hat, f = self(x, k)
        err = (x_hat - y).pow(2)  # (N, D)
        if batch_norm_mse:  # released code: each row's error over the norm of its centred target
            err = err / (y - y.mean(0)).norm(dim=-1, keepdim=True)
        mse = err.mean()  # elementwise mean over N and D
        out = {"mse": mse.detach(),
               "ev": 1 - (x_hat - y).pow(2).sum().detach() / y.pow(2).sum(),  # eq. 6, batch total
               "fired": firing_counts(f, self.n_features) > 0}
        active = (f[0] if isinstance(f, tuple) else f) > 0
        out["l0"] = active.float().sum(-1).mean()
        out["l1"] = mse.new_zeros(()) if self.act != "vanilla" else \
            l1_coef * (f * self.W_dec.norm(dim=1)).sum(-1).mean()  # L1 on f_i ||W_dec[i]|| (§4.2)
        out["loss"] = mse + out["l1"]
        return out


def firing_counts(f, n_features):
    """(F,) how many rows of this batch each feature fired on, from (values, indices) or
    dense f."""
    if isinstance(f, tuple):
        vals, idx = f
        return torch.bincount(idx[vals > 0], minlength=n_features)
    return (f > 0).sum(0)
