"""The Llama Scope sparse autoencoder (§2.1-2.4, §3.3.1, §3.3.3): TopK (eq. 5), Vanilla (§4.2).

    h = ReLU(W_enc x + b_enc);  keep the K largest h_i * ||W_dec[i]||;  x_hat = W_dec^T f + b_dec

The math only: schedules are recipe.py's, folding and JumpReLU inference.py's, sharding
parallel.py's, files formats.py's. Shapes: N rows, D model width, F features, K active."""
import math

import torch
import torch.nn.functional as F


class TopKEncode(torch.autograd.Function):
    """(values, indices), each (N, K): the K features with the largest h_i * s_i, h = ReLU(W_enc
    x + b_enc), s_i the decoder norm. As `SAE.forward_dense`, but the backward touches only the
    N*K selected entries: no (N, F) gradient is made (2*N*K*D flops, not 2*N*F*D)."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, scale, k, select):
        # 1. score every feature: scaling the encoder rows by s > 0 before the matmul ranks
        #    h_i * s_i without an (N, F) multiply
        score = torch.addmm(b_enc * scale, x, (W_enc * scale[:, None]).T)  # (N, F)
        # 2. keep the K best (ReLU is monotone, so selecting before it gives the same set)
        top, idx = select(score, k)  # (N, K)
        # 3. undo the scale: the kept value is h_i itself (eq. 5), ReLU applied
        vals = (top / scale[idx]).clamp_(min=0)  # (N, K)
        ctx.save_for_backward(x, idx, vals)
        ctx.n_features = W_enc.shape[0]
        return vals, idx

    @staticmethod
    def backward(ctx, grad_vals, grad_idx):
        x, idx, vals = ctx.saved_tensors
        # 1. the gradient reaching each kept h_i, through ReLU'
        g = grad_vals * (vals > 0)  # (N, K)
        # 2. grad W_enc[i] = sum of g_nk x_n over the (n, k) where feature i is active: the
        #    gradient embedding_bag gives its weight has that form, so its fused kernel computes
        #    it (about 2x faster than a sparse COO matmul here), with x as the output gradient
        with torch.enable_grad():
            W = torch.zeros(ctx.n_features, x.shape[1], device=x.device, dtype=g.dtype,
                            requires_grad=True)  # g: the values' dtype (bf16 x, fp32 weights)
            out = F.embedding_bag(idx, W, per_sample_weights=g, mode="sum")
            grad_W, = torch.autograd.grad(out, W, grad_outputs=x.to(g.dtype))  # (F, D)
        # 3. grad b_enc[i] = sum of g over the rows where feature i is active
        grad_b = torch.zeros(ctx.n_features, device=x.device, dtype=g.dtype)
        grad_b.index_add_(0, idx.flatten(), g.flatten())  # (F,)
        return None, grad_W, grad_b, None, None, None


class SAE(torch.nn.Module):
    """TopK:    h = ReLU(W_enc x + b_enc); keep the K largest h_i ||W_dec[i]||, f = h there, else 0
       Vanilla: f = ReLU(W_enc x + b_enc), loss adds l1_coef * sum_i f_i * ||W_dec[i]||
       x_hat = W_dec^T f + b_dec, + W_skip x for a skip transcoder (W_skip (D, D), 0 at start)

    W_enc (F, D), b_enc (F), W_dec (F, D): one ROW per feature (the paper's column W_dec[:, i]),
    so the sparse decoder gathers contiguous rows. Decoder norms are never renormalized in
    training: they enter the ranking (§2.4). A transcoder maps the MLP's input to its output.
    It trains on x * S_in to reconstruct target * S_out, S = sqrt(D) / E||x|| from the dataset
    norms `norm_in`, `norm_out` (§3.3.3). The matmuls run in `compute_dtype`; weights and Adam's
    state stay float32 (docs/precision.md). parallel.py replaces `select`, `reduce` to shard F."""

    def __init__(self, d_model, n_features, act="topk", k=50, transcoder=False,
                 init_decoder_norm=None, threshold=None, skip=False):
        super().__init__()
        assert act in ("topk", "vanilla", "jumprelu")
        self.d_model = d_model
        self.n_features = n_features
        self.act = act
        self.k = k
        self.threshold = threshold  # JumpReLU (inference.py): f_i = h_i if h_i > theta
        self.transcoder = transcoder
        self.W_enc = torch.nn.Parameter(torch.empty(n_features, d_model))
        self.b_enc = torch.nn.Parameter(torch.zeros(n_features))
        self.W_dec = torch.nn.Parameter(torch.empty(n_features, d_model))
        self.b_dec = torch.nn.Parameter(torch.zeros(d_model))
        self.skip = skip
        skip_weight = torch.nn.Parameter(torch.zeros(d_model, d_model)) if skip else None
        self.register_parameter("W_skip", skip_weight)  # (D_out, D_in), as nn.Linear
        self.register_buffer("norm_in", torch.zeros(()))
        self.register_buffer("norm_out", torch.zeros(()))
        self.compute_dtype = None  # None: the parameters' dtype
        self.init_decoder_norm = init_decoder_norm or math.sqrt(2 * d_model / n_features)
        self.init_(self.init_decoder_norm)

    def select(self, score, k):
        """The selection of eq. 5: (values, indices) of the K best scores (N, K) per row."""
        return score.topk(k, dim=-1, sorted=False)

    def reduce(self, partial):
        """The decoded sum (N, D) over all features: on one device, what it computed."""
        return partial

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
        """Dataset-wise normalization from a sample of rows (the first fill; `mean` over every
        rank's). center: b_dec starts at the mean target and b_enc at -W_enc S_in E[x_in], so each
        feature reads x - E[x] (the authors' library's option; the paper starts both at 0)."""
        self.norm_in.fill_(mean(x_in.float().norm(dim=-1)))
        self.norm_out.fill_(mean(x_out.float().norm(dim=-1)))
        if center:
            s_in, s_out = self.scales()
            mean_in = mean(x_in.float()).to(self.b_dec)  # (D,)
            mean_out = mean(x_out.float()).to(self.b_dec)  # (D,)
            self.b_dec.copy_(mean_out * s_out)
            self.b_enc.copy_(-self.W_enc @ (mean_in * s_in))

    def scales(self):
        """(S_in, S_out): multiply raw activations by these to get the SAE's training space."""
        return math.sqrt(self.d_model) / self.norm_in, math.sqrt(self.d_model) / self.norm_out

    def autocast(self):
        """The context the SAE's matmuls run in: compute_dtype, or as they are."""
        dtype = self.compute_dtype or self.W_enc.dtype
        return torch.autocast(self.W_enc.device.type, dtype, enabled=dtype != self.W_enc.dtype)

    def pre_acts(self, x, full=False):
        """(N, F) W_enc x + b_enc, in the compute dtype; full: in float32, as JumpReLU's theta is
        fit and applied (bf16 values tie, and a tie at theta flips whole)."""
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
        rank = self.W_dec.detach().norm(dim=1)  # (F,) eq. 5 ranks h_i ||W_dec[i]||
        with self.autocast():  # the (N, F) scores in compute_dtype, the K values back in fp32
            return TopKEncode.apply(x, self.W_enc, self.b_enc, rank, k or self.k, self.select)

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
        x_hat = self.decode(f)
        if self.skip:  # a skip transcoder: plus its linear path W_skip x
            with self.autocast():
                x_hat = x_hat + F.linear(x, self.W_skip)
        return x_hat, f

    def forward_dense(self, x, k=None):
        """Reference TopK, eq. 5 spelled out densely: the tests check `forward` against it."""
        with self.autocast():
            h = F.relu(self.pre_acts(x))  # (N, F)
            idx = (h * self.W_dec.norm(dim=1)).topk(k or self.k, dim=-1).indices  # (N, K)
            f = torch.zeros_like(h).scatter(1, idx, h.gather(1, idx))  # (N, F), K nonzeros
            skip = F.linear(x, self.W_skip) if self.skip else 0
            return f @ self.W_dec + self.b_dec + skip, f

    def loss(self, x_in, x_out, k=None, l1_coef=0.0, batch_norm_mse=False):
        """Loss and metrics for one minibatch of RAW activations (N, D) each."""
        # 1. into the training space (§3.3.3)
        s_in, s_out = self.scales()
        x = x_in.to(self.W_enc.dtype) * s_in
        y = x_out.to(self.W_enc.dtype) * s_out
        # 2. encode and decode
        x_hat, f = self(x, k)
        # 3. the squared error, elementwise mean over N and D
        err = (x_hat - y).pow(2)  # (N, D)
        if batch_norm_mse:  # released code: each row's error over the norm of its centred target
            err = err / (y - y.mean(0)).norm(dim=-1, keepdim=True)
        mse = err.mean()
        # 4. Vanilla's sparsity penalty on f_i ||W_dec[i]|| (§4.2); TopK needs none
        l1 = mse.new_zeros(())
        if self.act == "vanilla":
            l1 = l1_coef * (f * self.W_dec.norm(dim=1)).sum(-1).mean()
        active = (f[0] if isinstance(f, tuple) else f) > 0
        return {"loss": mse + l1, "mse": mse.detach(), "l1": l1,
                "ev": 1 - (x_hat - y).pow(2).sum().detach() / y.pow(2).sum(),  # eq. 6, batch
                "l0": active.float().sum(-1).mean(), "f": f}
