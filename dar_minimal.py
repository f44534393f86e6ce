"""
dar_minimal.py: Diffusion-Adaptive Routing (DAR, arXiv 2605.20708) for diffusion transformers, in one file.
A DiT with adaLN-Zero whose cross-layer information flow is either
  - the standard pre-LN residual stream:   h_l = h_0 + sum_{i<l} v_i                  (routing="residual")
  - DAR, softmax attention over depth:     h_l = sum_{i in S_l} alpha_{i->l}(t) v_i  (routing="dar")
        alpha_{i->l}(t) = softmax_i( q_l(t) . RMSNorm_l(v_i) / sqrt(d) )
where v_0 is the patch embedding and v_i = f_i(h_i; t) the gated output of sublayer i (attention or MLP).
Nothing is ever added to a running stream: every sublayer's input is rebuilt from the sources.
Then flow matching (SiT's linear interpolant), the samplers (Euler, Heun, Euler-Maruyama SDE, CFG) and the
paper's diagnostics. The convention, SiT's, everywhere in this project: t = 0 is pure noise, t = 1 is data,
    x_t = t * x1 + (1 - t) * x0,   x0 ~ N(0, I),   target velocity  x1 - x0.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------------
# Embedding layers (names and shapes as in the official DiT/SiT checkpoints)
# ----------------------------------------------------------------------------------------------------

def modulate(x, shift, scale):
    """adaLN modulation of a (B, N, d) tensor by per-sample (B, d) shift and scale."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
    """Image (B, C, H, W) -> patch tokens (B, N, d) with one strided convolution."""

    def __init__(self, patch_size, in_channels, hidden_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> vector: sinusoidal features (256 frequencies, as SiT feeds t, not rescaled) and an MLP."""

    def __init__(self, hidden_size, frequency_size=256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    @staticmethod
    def sinusoidal(t, dim, max_period=10000):
        """[cos(t * f_k), sin(t * f_k)] with f_k = max_period^(-k / (dim/2)), k = 0 .. dim/2 - 1."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t):
        return self.mlp(self.sinusoidal(t, self.frequency_size).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class label -> vector; the extra last row (id = num_classes) is the null class used by CFG."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def forward(self, y):
        return self.embedding_table(y)


def sincos_pos_embed_2d(dim, grid_size):
    """Fixed 2-D sin-cos positional embedding (grid_size^2, dim): first half encodes the column, second the row."""
    def sincos_1d(d, pos):
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2))
        out = pos.reshape(-1, 1).double() * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)
    row, col = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, col), sincos_1d(dim // 2, row)], dim=1).float()


# ----------------------------------------------------------------------------------------------------
# The two sublayers of a DiT block: v = gate * f(modulate(LayerNorm(h)))
# ----------------------------------------------------------------------------------------------------

class Attention(nn.Module):
    """Multi-head self-attention through scaled_dot_product_attention."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    """Two linear layers with GELU(tanh) between them, as in DiT."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """A DiT block: an attention sublayer and an MLP sublayer, each LayerNorm -> modulate -> f -> gate (adaLN-Zero)."""

    def __init__(self, hidden_size, num_heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def sublayers(self, c):
        """The block's two sublayers f_l(h; t) as functions of their input h, conditioned on c."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        attn = lambda h: gate1.unsqueeze(1) * self.attn(modulate(self.norm1(h), shift1, scale1))
        mlp = lambda h: gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(h), shift2, scale2))
        return attn, mlp

    def forward(self, h, c):
        """The residual block: h + v_attn, then + v_mlp."""
        attn, mlp = self.sublayers(c)
        h = h + attn(h)
        return h + mlp(h)


class FinalLayer(nn.Module):
    """The prediction head: LayerNorm -> modulate -> linear to patch pixels."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# ----------------------------------------------------------------------------------------------------
# DAR: softmax attention over depth
# ----------------------------------------------------------------------------------------------------

def fp32(x):
    """x in at least float32: bf16/fp16 are upcast, float64 is kept (scores and softmax run in >= fp32)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def chunk_sources(l, L, S):
    """Indices of the sources S_l read by sublayer l (1..L; l = L+1 is the final aggregator), chunk size S.

    Chunk n holds sublayers (n-1)S+1 .. nS; its summary is c_n = v_{nS} (c_0 = v_0). Sublayer l in chunk n
    reads the summaries c_0..c_{n-1} and the raw outputs of its own chunk so far, v_{(n-1)S+1} .. v_{l-1}.
    The final aggregator reads the summaries of all earlier chunks and every raw output of the last chunk.
    """
    n = (min(l, L) - 1) // S + 1                                   # chunk of l (the final reader joins the last chunk)
    summaries = [m * S for m in range(n)]                          # c_0 = v_0, c_m = v_{mS}
    own_chunk = list(range((n - 1) * S + 1, l))                    # v_{(n-1)S+1} .. v_{l-1}
    return summaries + own_chunk


# The queries: q_l = w_l (static); q_l(t) = w_l + e(t) with e(t) a new zero-initialised projection of the timestep
# embedding (static_t) or, as the paper words it, e(t) = the timestep embedding itself, the t-embedder's last layer
# zero-initialised (static_t_embed, no new parameters); q_l = W_q^(l) v_{l-1} (dynamic).
QUERIES = ("static", "static_t", "static_t_embed", "dynamic")


class DepthRouter(nn.Module):
    """DAR's L+1 aggregators: reader l = 1..L builds sublayer l's input h_l, reader L+1 the final layer's input.
    Each has a query q_l(t) and the RMSNorm weight g_l of its keys k_i = RMSNorm_l(v_i) = g_l * v_i / RMS(v_i)."""

    def __init__(self, hidden_size, num_sublayers, query="static_t", chunk=4):
        super().__init__()
        d, L = hidden_size, num_sublayers
        self.query, self.num_sublayers, self.chunk = query, L, chunk
        self.sources = [chunk_sources(l, L, chunk) for l in range(1, L + 2)]   # S_l, fixed by the chunk rule
        self.key_weight = nn.Parameter(torch.ones(L + 1, d))                    # g_l
        if query in ("static", "static_t", "static_t_embed"):
            self.w = nn.Parameter(torch.zeros(L + 1, d))                        # w_l, zero: uniform weights at init
        if query == "static_t":                                                 # (static_t_embed: e(t) is the DiT's)
            self.e = nn.Sequential(nn.SiLU(), nn.Linear(d, d))                  # e(t), zero at init: static variant
            nn.init.zeros_(self.e[-1].weight)
            nn.init.zeros_(self.e[-1].bias)
        if query == "dynamic":
            self.W_q = nn.Parameter(torch.zeros(L + 1, d, d))                   # W_q^(l), zero: uniform at init
        self.record_alpha, self.alpha = False, []   # record_alpha=True: each forward's weights kept in self.alpha

    def queries(self, t_emb):
        """Static queries of every reader, q_l(t) * g_l / sqrt(d), (B, L+1, d): since q . (g * v) = (q * g) . v, the
        key's RMSNorm weight and the score's 1/sqrt(d) go into the query once. None for dynamic queries."""
        if self.query == "dynamic":
            return None
        q = self.w.expand(t_emb.shape[0], -1, -1)                               # static: q_l = w_l
        if self.query == "static_t":
            q = q + self.e(t_emb).unsqueeze(1)                                  # static+t: q_l(t) = w_l + e(t)
        if self.query == "static_t_embed":
            q = q + t_emb.unsqueeze(1)                                          # e(t) = the t-embedder's output
        return q * self.key_weight / math.sqrt(q.shape[-1])

    def keys(self, v_i, q):
        """What source v_i offers its readers, computed once when it is produced: its scores for every reader,
        s_{i->l} = q_l . RMSNorm_l(v_i) / sqrt(d), (B, N, L+1) in one product; with dynamic queries 1 / RMS(v_i)."""
        r = torch.rsqrt(fp32(v_i).pow(2).mean(-1, keepdim=True) + 1e-6)       # 1 / RMS(v_i), (B, N, 1)
        return r if q is None else fp32(v_i @ q.mT) * r

    def forward(self, l, v, keys):
        """h_l = sum_{i in S_l} alpha_{i->l} v_i with alpha_{i->l} = softmax_i(s_{i->l}), for every token;
        v: the sources v_0, v_1, .. so far, keys: what keys() gave for each."""
        S_l = self.sources[l - 1]
        if self.query == "dynamic":                                 # q_l = W_q^(l) v_{l-1}, one per token
            q_l = v[l - 1] @ self.W_q[l - 1].mT * self.key_weight[l - 1] / math.sqrt(v[0].shape[-1])
            s = torch.stack([fp32((v[i] * q_l).sum(-1)) * keys[i][..., 0] for i in S_l], dim=-1)
        else:
            s = torch.stack([keys[i][..., l - 1] for i in S_l], dim=-1)   # (B, N, |S_l|): the scores of reader l
        alpha = s.softmax(dim=-1)                                   # over the sources: sums to 1 for every token
        if self.record_alpha:
            self.alpha.append(alpha.detach())
        alpha = alpha.to(v[0].dtype)
        return sum(alpha[..., j:j + 1] * v[i] for j, i in enumerate(S_l))


# ----------------------------------------------------------------------------------------------------
# The DiT, with residual or DAR routing
# ----------------------------------------------------------------------------------------------------

class DiT(nn.Module):
    """Diffusion transformer (adaLN-Zero) predicting the flow-matching velocity; routing "residual" or "dar"."""

    def __init__(self, input_size=32, patch_size=2, in_channels=3, hidden_size=384, depth=12, num_heads=6,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=10, learn_sigma=False, routing="dar",
                 dar_query="static_t", dar_chunk=4):
        super().__init__()
        if routing not in ("residual", "dar") or dar_query not in QUERIES or not isinstance(dar_chunk, int) or \
                dar_chunk < 1:
            raise ValueError(f"routing must be 'residual' or 'dar', dar_query one of {QUERIES} and dar_chunk an "
                             f"integer >= 1, got {routing!r}, {dar_query!r} and {dar_chunk!r}")
        if depth < 1 or input_size % patch_size or hidden_size % num_heads:
            raise ValueError(f"need depth >= 1, input_size divisible by patch_size and hidden_size by num_heads, got "
                             f"depth {depth}, input_size {input_size}, patch_size {patch_size}, hidden_size "
                             f"{hidden_size}, num_heads {num_heads}")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.num_classes, self.class_dropout_prob = num_classes, class_dropout_prob
        self.routing = routing
        self.config = dict(input_size=input_size, patch_size=patch_size, in_channels=in_channels,
                           hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                           class_dropout_prob=class_dropout_prob, num_classes=num_classes, learn_sigma=learn_sigma,
                           routing=routing, dar_query=dar_query, dar_chunk=dar_chunk)

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = (input_size // patch_size) ** 2
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)  # fixed
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()
        if routing == "dar":     # after the backbone's random init, so both routings start from the same weights
            self.router = DepthRouter(hidden_size, 2 * depth, dar_query, dar_chunk)
        if routing == "dar" and dar_query == "static_t_embed":
            # the paper: "the final layer of the t-embedder is zero-initialized, so that e(t) = 0 at initialization";
            # the one layer in which this arm starts unlike the residual DiT
            nn.init.zeros_(self.t_embedder.mlp[-1].weight)
            nn.init.zeros_(self.t_embedder.mlp[-1].bias)

    def initialize_weights(self):
        """DiT's initialisation: xavier linears, fixed sin-cos positions, adaLN-Zero (zero modulation and output)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        self.pos_embed.data.copy_(sincos_pos_embed_2d(self.pos_embed.shape[-1], self.input_size // self.patch_size))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for layer in self.t_embedder.mlp[::2]:
            nn.init.normal_(layer.weight, std=0.02)
        for layer in [m.adaLN_modulation[-1] for m in (*self.blocks, self.final_layer)] + [self.final_layer.linear]:
            nn.init.zeros_(layer.weight)                                  # adaLN-Zero: zero modulation and output
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x):
        """Patch tokens (B, N, p*p*C) -> image (B, C, H, W)."""
        p, c, s = self.patch_size, self.out_channels, self.input_size // self.patch_size
        x = x.reshape(x.shape[0], s, s, p, p, c)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(x.shape[0], c, s * p, s * p)

    def forward(self, x, t, y):
        """Velocity v(x_t, t, y) for images x (B, C, H, W), times t (B,) in [0, 1] and labels y (B,)."""
        if x.ndim != 4 or x.shape[1:] != (self.in_channels, self.input_size, self.input_size):
            raise ValueError(f"expected images of shape (B, {self.in_channels}, {self.input_size}, "
                             f"{self.input_size}), got {tuple(x.shape)}")
        if t.shape != (x.shape[0],) or y.shape != (x.shape[0],):
            raise ValueError(f"expected t and y of shape ({x.shape[0]},), got {tuple(t.shape)} and {tuple(y.shape)}")
        if not torch.compiler.is_compiling() and (y.device.type == "cpu" or not self.training):
            check_labels(y, self.num_classes)      # data-dependent: a GPU would wait for it at every training step
        h0 = self.x_embedder(x) + self.pos_embed                   # v_0 = h_0: patches + positions
        t_emb = self.t_embedder(t)
        c = t_emb + self.y_embedder(y)                             # adaLN conditioning
        h = self.forward_residual(h0, c) if self.routing == "residual" else self.forward_dar(h0, c, t_emb)
        return self.unpatchify(self.final_layer(h, c))[:, :self.in_channels]   # learn_sigma: drop variance channels

    def forward_residual(self, h, c):
        """The residual stream: h_{l+1} = h_l + v_l, two sublayers per block."""
        for block in self.blocks:
            h = block(h, c)
        return h

    def forward_dar(self, h0, c, t_emb):
        """DAR: every sublayer's input, and the final layer's, is a fresh softmax mixture of earlier outputs."""
        router = self.router
        router.alpha = []
        q = router.queries(t_emb)                                  # static queries of all readers (None: dynamic)
        v, keys = [h0], [router.keys(h0, q)]                       # v_0 = h_0
        h = router(1, v, keys)                                     # h_1 = v_0
        for block in self.blocks:
            for f in block.sublayers(c):                           # attention, then MLP
                v.append(f(h))                                     # v_l = f_l(h_l; t)
                keys.append(router.keys(v[-1], q))                 # its scores for all its readers, once
                h = router(len(v), v, keys)                        # h_{l+1} = sum_{i in S_{l+1}} alpha_{i->l+1} v_i
        return h                                                   # h_{L+1}: the final aggregator's output


def residual_to_dar(model, dar_query="static_t", dar_chunk=1):
    """A DAR model carrying a residual DiT's weights (router fresh, zero queries). With dar_chunk=1 it computes
    the same function as the residual model at the start (uniform weights = residual stream / |S_l|, and
    every consumer starts with a scale-invariant LayerNorm)."""
    if model.routing != "residual" or dar_query == "static_t_embed":
        raise ValueError(f"residual_to_dar converts a residual DiT, to any query but static_t_embed (its e(t) is the "
                         f"trained t-embedding, not zero); got routing={model.routing!r}, dar_query={dar_query!r}")
    dar = DiT(**dict(model.config, routing="dar", dar_query=dar_query, dar_chunk=dar_chunk))
    dar.load_state_dict(model.state_dict(), strict=False)             # everything but the router
    return dar.to(next(model.parameters()).device)


# ----------------------------------------------------------------------------------------------------
# Flow matching (SiT's linear interpolant; t = 0 noise, t = 1 data)
# ----------------------------------------------------------------------------------------------------

def check_labels(y, num_classes):
    """ValueError unless every label is in [0, num_classes] (num_classes itself is the null class)."""
    if y.dtype not in (torch.int64, torch.int32) or (y.numel() and (y.min() < 0 or y.max() > num_classes)):
        raise ValueError(f"labels must be integers in [0, {num_classes}] ({num_classes} = null class)")


def interpolate(x1, x0, t):
    """x_t = t x1 + (1 - t) x0, with one t per sample."""
    t = t.view(-1, *([1] * (x1.ndim - 1)))
    return t * x1 + (1 - t) * x0


def flow_matching_loss(model, x1, y, t=None, x0=None, generator=None, t_sampling="uniform", reduction="mean",
                       drop=None):
    """|| v(x_t, t, y) - (x1 - x0) ||^2 with x_t = t x1 + (1-t) x0; label dropout for CFG when model.training
    (drop: which labels become the null class, else drawn here)."""
    if t_sampling not in ("uniform", "logit_normal"):
        raise ValueError(f"t_sampling must be 'uniform' or 'logit_normal', got {t_sampling!r}")
    B, dev = x1.shape[0], x1.device
    if t is None:                                                                     # t ~ U(0, 1) or logit-normal
        t = torch.rand(B, device=dev, generator=generator) if t_sampling == "uniform" else \
            torch.sigmoid(torch.randn(B, device=dev, generator=generator))
    if x0 is None:
        x0 = torch.randn(x1.shape, device=dev, generator=generator)                  # noise at t = 0
    if model.training and model.class_dropout_prob > 0:
        if drop is None:
            drop = torch.rand(B, device=dev, generator=generator) < model.class_dropout_prob
        y = torch.where(drop, torch.full_like(y, model.num_classes), y)             # null class for CFG
    loss = (fp32(model(interpolate(x1, x0, t), t, y)) - (x1 - x0)).pow(2).flatten(1).mean(1)   # per-sample MSE
    return loss.mean() if reduction == "mean" else loss


# ----------------------------------------------------------------------------------------------------
# Sampling: integrate dx/dt = v(x, t) from t = 0 (noise) to t = 1 (data)
# ----------------------------------------------------------------------------------------------------

def guided(velocity_fn, cfg_scale, null_class):
    """Classifier-free guidance on all channels: v_u + s (v_c - v_u), both halves in one batched call."""
    if cfg_scale == 1.0:
        return velocity_fn

    def v(x, t, y):
        y_null = torch.full_like(y, null_class)
        v_c, v_u = velocity_fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_null])).chunk(2)
        return v_u + cfg_scale * (v_c - v_u)
    return v


@torch.no_grad()
def sample(velocity_fn, x0, y=None, steps=50, method="euler", cfg_scale=1.0, null_class=None, generator=None):
    """Samples from noise x0 in `steps` steps of Euler, Heun (2nd order) or an Euler-Maruyama SDE; velocity_fn(x, t, y)
    is a DiT or any analytic field, t of shape (B,). The SDE dx = [v + w(t)/2 * score] dt + sqrt(w(t)) dW, w(t) = 1 - t,
    score(x, t) = -(x - t v) / (1 - t) for the linear path, has the ODE's marginals; its last step is deterministic."""
    if method not in ("euler", "heun", "sde") or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"method must be 'euler', 'heun' or 'sde' and steps a positive integer, got {method!r} and "
                         f"{steps!r}")
    num_classes = getattr(velocity_fn, "num_classes", None)
    null_class = num_classes if null_class is None else null_class
    if y is not None and num_classes is not None:
        check_labels(y, num_classes)
    if cfg_scale != 1.0 and (y is None or null_class is None):
        raise ValueError("classifier-free guidance needs labels y and a null_class")
    v = guided(velocity_fn, cfg_scale, null_class)
    x, ts = x0, torch.linspace(0, 1, steps + 1, device=x0.device)
    for i in range(steps):
        t, dt = ts[i].expand(x.shape[0]), ts[i + 1] - ts[i]
        vt = fp32(v(x, t, y))
        if method == "euler" or (method == "sde" and i == steps - 1):
            x = x + dt * vt                                                   # x_{t+dt} = x_t + dt v
        elif method == "heun":
            x = x + dt / 2 * (vt + fp32(v(x + dt * vt, t + dt, y)))           # trapezoid on v (Euler predictor)
        else:
            w = 1 - ts[i]                                                     # diffusion coefficient w(t)
            drift = vt - 0.5 * (x - ts[i] * vt)                               # v + w/2 * score = v - (x - t v)/2
            noise = torch.randn(x.shape, device=x.device, generator=generator)
            x = x + dt * drift + torch.sqrt(w * dt) * noise
    return x


# ----------------------------------------------------------------------------------------------------
# Diagnostics: the paper's view of cross-layer information flow (method page, section 1)
# ----------------------------------------------------------------------------------------------------

def block_states(model):
    """Hooks collecting z_k, the state block k hands on (the input of the next LayerNorm: a residual block's output,
    DAR's mixture for block k+1 or the final layer): (list the next forward fills, a function removing the hooks)."""
    states = []
    norms = [block.norm1 for block in model.blocks[1:]] + [model.final_layer.norm_final]
    hooks = [norm.register_forward_pre_hook(lambda m, args: states.append(args[0])) for norm in norms]
    return states, lambda: [h.remove() for h in hooks]


def flow_statistics(model, x1, y, t, x0):
    """Per block k at time t: forward RMS(z_k), gradient RMS(dL/dz_k) with L the velocity MSE, and the
    per-token cosine similarity cos(z_k, z_{k+1}) averaged over batch and tokens (one value fewer)."""
    rms = lambda z: z.pow(2).mean(-1).sqrt().mean().item()           # over features, averaged over batch and tokens
    states, remove = block_states(model)
    loss = flow_matching_loss(model, x1, y, t=torch.full((len(x1),), t, device=x1.device), x0=x0)
    remove()
    grads = torch.autograd.grad(loss, states)
    return dict(forward_rms=[rms(z) for z in states], gradient_rms=[rms(g) for g in grads],
                cosine=[F.cosine_similarity(a, b, dim=-1).mean().item() for a, b in zip(states, states[1:])])


@torch.no_grad()
def routing_map(model, x1, y, ts, x0):
    """alpha_{i->l}(t) averaged over batch and tokens, for every t in ts: a tensor (len(ts), L+1 readers,
    L+1 sources), zero where source i is not in S_l."""
    router, L = model.router, len(model.router.sources) - 1
    out = torch.zeros(len(ts), L + 1, L + 1)
    router.record_alpha = True
    for k, t in enumerate(ts):
        tt = torch.full((len(x1),), t, device=x1.device)
        model(interpolate(x1, x0, tt), tt, y)
        for l, alpha in enumerate(router.alpha):
            out[k, l, router.sources[l]] = alpha.float().mean((0, 1)).cpu()
    router.record_alpha = False
    return out


def gated_residual_forward(model, x, t, y, gates):
    """The residual DiT unrolled, h_l = sum_{i<l} gates[l-1, i] v_i (final layer: row L): with gates = 1 it is the
    plain forward, exactly; the gradient w.r.t. gates[l-1, i] is the counterfactual importance <v_i, dL/dh_l>."""
    c = model.t_embedder(t) + model.y_embedder(y)
    v = [model.x_embedder(x) + model.pos_embed]
    mix = lambda l: sum(gates[l - 1, i] * v[i] for i in range(l))
    for block in model.blocks:
        for f in block.sublayers(c):
            v.append(f(mix(len(v))))
    return model.unpatchify(model.final_layer(mix(len(v)), c))[:, :model.in_channels]


def source_importance(model, x1, y, ts, x0):
    """dL/dgate_{i->l} of the residual model at every t in ts, L the velocity MSE: (len(ts), L+1, L+1)."""
    L = 2 * len(model.blocks)
    out = torch.zeros(len(ts), L + 1, L + 1)
    for k, t in enumerate(ts):
        gates = torch.ones(L + 1, L + 1, device=x1.device, requires_grad=True)
        tt = torch.full((len(x1),), t, device=x1.device)
        loss = (gated_residual_forward(model, interpolate(x1, x0, tt), tt, y, gates) - (x1 - x0)).pow(2).mean()
        out[k] = torch.tril(torch.autograd.grad(loss, gates)[0]).cpu()      # only i < l (row l-1) exist
    return out


def ridge_r2(X_fit, t_fit, X_test, t_test, lam=1e-2):
    """R^2 on (X_test, t_test) of a ridge regression t ~ X fitted on (X_fit, t_fit), features standardised."""
    mu, sd = X_fit.mean(0), X_fit.std(0) + 1e-8
    A, B = (X_fit - mu) / sd, (X_test - mu) / sd
    w = torch.linalg.solve(A.T @ A + lam * len(A) * torch.eye(A.shape[1], dtype=A.dtype), A.T @ (t_fit - t_fit.mean()))
    return (1 - (t_test - B @ w - t_fit.mean()).pow(2).sum() / (t_test - t_test.mean()).pow(2).sum()).item()


@torch.no_grad()
def timestep_probe(model, x1, y, generator):
    """How linearly readable t is from the token-pooled state at each depth: ridge R^2 per block, fitted and
    scored on disjoint halves of (image, noise, t) triples; also R^2 from the raw x_t as the reference."""
    n = len(x1) // 2
    t = torch.rand(len(x1), generator=generator).to(x1.device)
    x0 = torch.randn(x1.shape, generator=generator).to(x1.device)
    xt = interpolate(x1, x0, t)
    states, remove = block_states(model)
    model(xt, t, y)
    remove()
    score = lambda X: ridge_r2(X[:n].double().cpu(), t[:n].double().cpu(), X[n:].double().cpu(), t[n:].double().cpu())
    return dict(blocks=[score(z.mean(1)) for z in states], raw_xt=score(xt.flatten(1)))
