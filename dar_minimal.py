"""
dar_minimal.py: Diffusion-Adaptive Routing (DAR, arXiv 2605.20708) for diffusion transformers, in one file.

A DiT with adaLN-Zero whose cross-layer information flow is either
  - the standard pre-LN residual stream:   h_l = h_0 + sum_{i<l} v_i                  (routing="residual")
  - DAR, softmax attention over depth:     h_l = sum_{i in S_l} alpha_{i->l}(t) v_i  (routing="dar")
        alpha_{i->l}(t) = softmax_i( q_l(t) . RMSNorm_l(v_i) / sqrt(d) )
where v_0 is the patch embedding and v_i = f_i(h_i; t) the gated output of sublayer i (attention or MLP).
Nothing is ever added to a running stream: every sublayer's input is rebuilt from the sources.

Then flow matching (SiT's linear interpolant) and the samplers (Euler, Heun, Euler-Maruyama SDE, CFG).

Convention (SiT's), used everywhere in this project: t = 0 is pure noise, t = 1 is data,
    x_t = t * x1 + (1 - t) * x0,   x0 ~ N(0, I),   target velocity  x1 - x0.
"""
import math
import weakref

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

    def forward(self, x, c):
        """The residual block: x + v_attn, then + v_mlp."""
        attn, mlp = self.sublayers(c)
        x = x + attn(x)
        x = x + mlp(x)
        return x


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
    """x in at least float32: bf16/fp16 are upcast, float64 is kept."""
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


def key_scores(v_i, q):
    """What the readers need of source v_i, computed once when v_i is produced, and r = 1 / RMS(v_i), (B, N, 1).
    Static queries: the scores q_l . RMSNorm_l(v_i) / sqrt(d) of the readers in q in one matmul, (B, N, readers) in fp32
    (q from DepthRouter.static_queries, RMSNorm weight and 1/sqrt(d) folded in); dynamic queries (q None): r."""
    norm = torch.linalg.vector_norm(v_i, dim=-1, keepdim=True,                # one reduction in >= fp32
                                    dtype=torch.promote_types(v_i.dtype, torch.float32))
    r = torch.rsqrt(norm.square() / v_i.shape[-1] + 1e-6)                     # RMSNorm(v) = v * r * g
    return (r if q is None else fp32(v_i @ q.to(v_i.dtype).mT) * r), r


class DepthRouter(nn.Module):
    """The aggregators of DAR: queries q_l(t) and RMSNorm weights g_l for readers l = 1..L and the final one (L+1)."""

    def __init__(self, hidden_size, num_sublayers, query="static_t", chunk=4):
        super().__init__()
        d, L = hidden_size, num_sublayers
        self.query, self.num_sublayers, self.chunk = query, L, chunk
        self.sources = [chunk_sources(l, L, chunk) for l in range(1, L + 2)]   # S_l, fixed by the chunk rule
        self.key_weight = nn.Parameter(torch.ones(L + 1, d))                    # g_l: RMSNorm weight of aggregator l
        if query in ("static", "static_t"):
            self.w = nn.Parameter(torch.zeros(L + 1, d))                        # w_l, zero: uniform weights at init
        if query == "static_t":
            self.e = nn.Sequential(nn.SiLU(), nn.Linear(d, d))                  # e(t), zero at init: static variant
            nn.init.zeros_(self.e[-1].weight)
            nn.init.zeros_(self.e[-1].bias)
        if query == "dynamic":
            self.W_q = nn.Parameter(torch.zeros(L + 1, d, d))                   # W_q^(l), zero: uniform at init
        self.record_alpha = False       # set True to keep the weights of the last forward in self.alpha
        self.alpha = []

    def static_queries(self, t_emb):
        """q_l(t) for every reader at once, RMSNorm weight and 1/sqrt(d) folded in: (B, L+1, d), or None if dynamic."""
        if self.query == "dynamic":
            return None
        q = self.w.expand(t_emb.shape[0], -1, -1)                               # static: q_l = w_l
        if self.query == "static_t":
            q = q + self.e(t_emb).unsqueeze(1)                                  # static+t: q_l(t) = w_l + e(t)
        return q * self.key_weight / math.sqrt(q.shape[-1])

    def forward(self, l, v, s, q):
        """h_l = sum_{i in S_l} alpha_{i->l} v_i with alpha = softmax_i(q_l . RMSNorm(v_i) / sqrt(d)), per token;
        v: the sources so far, s: what key_scores gave for each."""
        idx = self.sources[l - 1]
        if q is not None:
            scores = torch.cat([s[i][..., l - 1:l] for i in idx], dim=-1)      # precomputed by key_scores
        else:
            q_l = (v[l - 1] @ self.W_q[l - 1].mT) * self.key_weight[l - 1] / math.sqrt(v[0].shape[-1])  # W_q v_{l-1}
            scores = torch.cat([fp32((v[i] * q_l).sum(-1, keepdim=True)) * s[i] for i in idx], dim=-1)
        alpha = scores.softmax(dim=-1)                                          # (B, N, |S_l|), sums to 1 per token
        if self.record_alpha:
            self.alpha.append(alpha.detach())
        return sum(alpha[..., j:j + 1].to(v[i].dtype) * v[i] for j, i in enumerate(idx))


class Sources:
    """The sources v_0, v_1, ... of one DAR forward, each with its key scores, in a list: DAR as written."""

    def __init__(self, router, q):
        self.router, self.q, self.v, self.s = router, q, [], []

    def push(self, v_i):
        """Append source v_i, then return the input of the next reader, h_{i+1} (i = L: the final aggregator's)."""
        self.v.append(v_i)
        self.s.append(key_scores(v_i, self.q)[0])
        return self.router(len(self.v), self.v, self.s, self.q)


# ----------------------------------------------------------------------------------------------------
# The same sums, fast in eager mode (static queries)
#
# Summing Python lists costs about 3 memory passes per (reader, source) pair forward and 9 backward, and autograd
# keeps every v_i twice (for the mixture and for the key norm). Instead:
#   - every source is copied once, when produced, into its slot of one buffer: the summaries c_0, c_1, .. first,
#     then every other output in order, so that a reader's sources are two slot ranges and its mixture one or two
#     products (slot by slot for few slots, else one bmm). The mixture h_{i+1} made right after v_i arrives is
#     written next to it, in the same slot: the buffer is (L+1, 2, tokens, d);
#   - the scores and softmax weights are small tables (reader, slot, tokens), tokens last: a reader's softmax runs
#     over the first dimension, over all slots, those outside S_l holding -inf (weight 0); on the CPU a softmax over
#     a last dimension of a few entries is many times slower;
#   - the backward is turned around. Reader l only files dL/dh_l; then each source gathers what it needs from all
#     its readers, a contiguous range of them, in one product each:
#         dL/ds_{i->l} = alpha_{i->l} (v_i . dL/dh_l - h_l . dL/dh_l)      (the softmax's backward)
#         dL/dv_i      = sum_l alpha_{i->l} dL/dh_l   + the key scores' part (see Push.backward)
#     The first reader of v_i is l = i+1, so the product of slot (v_i, h_{i+1}) with its readers' dL/dh_l gives
#     h_{i+1} . dL/dh_{i+1} too, just before the first source that needs it.
#     One autograd node per source, Push: "v_i in, h_{i+1} out". Each Push also takes the previous one's output, so
#     autograd runs its backward after those of all later Pushes: after all the readers of v_i.
# Autograd keeps no source. The tests compare outputs and gradients with the plain definition. Under torch.compile
# (which fuses the plain sums) and for dynamic queries the list above is used. Measured: README, Cost.
# ----------------------------------------------------------------------------------------------------

SUM_SLOTS = {"cpu": 3, "cuda": 4}   # weighted sums: slot by slot up to this many slots, beyond as one bmm
DOT_SLOTS = {"cpu": 0, "cuda": 4}   # dot products: likewise (on the CPU even the small bmm beats multiply-and-sum)


def use_bmm(x, few=SUM_SLOTS):
    """Whether a product over the n slots of x (n, T, d) runs as one bmm: thin bmms are slow on few slots."""
    return x.shape[0] > few.get(x.device.type, 4)


def weighted_sum(w, x, out, add=False):
    """sum_i w[i] x[i] into out (T, d), or added to it, for weights w (n, T) and slots x (n, T, d); returns out."""
    w = w.to(x.dtype)
    if use_bmm(x):                                   # (T, 1, n) @ (T, n, d); beta 0: what out held is ignored
        out.unsqueeze(1).baddbmm_(w.mT.unsqueeze(1).contiguous(), x.transpose(0, 1), beta=float(add))
        return out
    for x_i, w_i in zip(x, w.unsqueeze(-1)):                         # w_i: (T, 1)
        if add:
            out.addcmul_(x_i, w_i)
        else:
            torch.mul(x_i, w_i, out=out)
            add = True
    return out


def source_dots(dh, vh):
    """v . dh[l] for slots dh (n, T, d), and h . dh[0], for vh = (v, h) (2, T, d): (n, T) and (T,) in >= fp32."""
    if use_bmm(dh, DOT_SLOTS):
        dots = fp32(torch.bmm(vh.transpose(0, 1), dh.permute(1, 2, 0)))    # (T, 2, n): two rows times a matrix
        return dots[:, 0].mT, dots[:, 1, 0]
    f32 = torch.promote_types(dh.dtype, torch.float32)
    return (dh * vh[0]).sum(-1, dtype=f32), (dh[0] * vh[1]).sum(-1, dtype=f32)


KEPT = weakref.WeakKeyDictionary()  # per router, (CPU) slot buffers kept for its next forward: SlotSources.buffer


class SlotSources:
    """The same sources in one slot buffer, for eager mode with static queries (see above)."""

    def __init__(self, router, shape, q, dtype):
        (B, N, d), L, S = shape, router.num_sublayers, router.chunk
        self.router, self.q, self.shape, self.L, self.S, self.N = router, q, shape, L, S, -(-L // S)
        f32 = dict(dtype=torch.promote_types(dtype, torch.float32), device=q.device)
        self.vh = self.buffer("vh", (L + 1, 2, B * N, d), dtype)          # vh[k] = (v_i, h_{i+1}) in slot k of v_i
        self.v = self.vh[:, 0]                                             # v[k]: the source in slot k
        self.h_out = self.vh.data[:, 1]      # what Push returns: the h in vh, through an alias with its own version
        # counter (.data), so that autograd does not take later writes into vh for in-place changes of a returned h
        self.s = torch.full((L + 1, L + 1, B * N), -math.inf, **f32)       # s[l-1, k]: score of slot k for reader l
        self.r = torch.empty(L + 1, B * N, **f32)                          # r[k]: 1 / RMS of slot k
        grad = torch.is_grad_enabled()                                     # alpha only for the backward:
        self.alpha = torch.empty(L + 1, L + 1, B * N, **f32) if grad else None   # alpha[l-1, k]: weight of slot k in h_l
        self.hdh = torch.empty(L + 1, B * N, **f32)                        # (backward) hdh[l-1]: h_l . dL/dh_l
        self.dh = self.dq = None                                           # (backward) dL/dh_l per reader, dL/dq
        self.plan = [(self.slot(i), self.readers(i), self.read_slots(i + 1)) for i in range(L + 1)]
        self.count, self.h, self.done = 0, None, False         # done: its backward has run to the end

    def buffer(self, name, shape, dtype):
        """An empty buffer. On the CPU, the one of an earlier forward that is gone or done: there, fresh pages cost
        more than the work done in them (CUDA's caching allocator already reuses memory)."""
        kept = KEPT.setdefault(self.router, {})
        x, owner = kept.get(name, (None, None))
        fits = x is not None and (x.shape, x.dtype, x.device) == (shape, dtype, self.q.device)
        if not (fits and getattr(owner(), "done", True)):                  # owner() None: that forward is gone
            x = torch.empty(shape, dtype=dtype, device=self.q.device)
        if x.device.type == "cpu":
            kept[name] = (x, weakref.ref(self))
        return x

    def taken(self):
        """Whether a later forward has taken the buffers of this one (possible once its backward is done)."""
        kept = KEPT.get(self.router, {}).items()
        return any(x is getattr(self, name) and owner() is not self for name, (x, owner) in kept)

    def slot(self, i):
        """Slot of v_i: the summaries c_0 = v_0, c_n = v_{nS} (n < N) take slots 0..N-1, then the other v_i in order."""
        n, j = divmod(i, self.S)
        return n if j == 0 and n < self.N else self.N + i - 1 - min((i - 1) // self.S, self.N - 1)

    def readers(self, i):
        """The readers of v_i as a range (a, b), l = a+1 .. b: all later ones for a summary or in the last chunk, else
        the rest of its chunk."""
        n, j = divmod(i, self.S)
        last = j == 0 and n < self.N or (i - 1) // self.S + 1 == self.N
        return i, self.L + 1 if last else ((i - 1) // self.S + 1) * self.S

    def read_slots(self, l):
        """The slots of S_l as (n, r0, m): summaries 0..n-1, then the m outputs of its chunk so far from slot r0."""
        n = (min(l, self.L) - 1) // self.S + 1                             # reader l is in chunk n
        return n, self.N + (n - 1) * (self.S - 1), l - 1 - (n - 1) * self.S

    def push(self, v_i):
        """Append source v_i, then return h_{i+1} (Push)."""
        h = Push.apply(v_i, self.q, self.h, self)
        self.h = h if self.count <= self.L else None       # not the last (self -> h -> its node -> self: a cycle)
        return h


class Push(torch.autograd.Function):
    """v_i into its slot with its readers' scores; h_{i+1} out of the slots. The backward files reader i+1's part,
    then computes dL/dv_i from all its readers (and, at v_0, the last, returns dL/dq). h_i, the previous Push's output,
    is an input only so that autograd runs this backward after the later Pushes', whatever f_i is."""

    @staticmethod
    def forward(ctx, v_i, q, h_i, src):
        i, T = src.count, src.v.shape[1]
        k, (a, b), (n, r0, m) = src.plan[i]
        src.count += 1
        src.v[k] = v_i.reshape(T, -1)
        s, r = key_scores(src.v[k].view(src.shape), q[:, a:b])             # read back from the slot, as backward will
        src.s[a:b, k], src.r[k] = s.view(T, -1).mT, r.view(T)              # for its readers a+1 .. b
        alpha = src.s[i].softmax(dim=0)                                     # reader l = i+1, (L+1, T): 0 off S_l (-inf)
        if src.alpha is not None:
            src.alpha[i] = alpha
        h = weighted_sum(alpha[:n], src.v[:n], src.vh[k, 1])                # summaries c_0 .. c_{n-1}, next to v_i
        if m:
            weighted_sum(alpha[r0:r0 + m], src.v[r0:r0 + m], h, add=True)   # then the outputs of chunk n so far
        if src.router.record_alpha:
            src.router.alpha.append(torch.cat([alpha[:n], alpha[r0:r0 + m]]).mT.reshape(*src.shape[:2], -1))
        ctx.src, ctx.i = src, i
        return src.h_out[k].view(src.shape)

    @staticmethod
    def backward(ctx, dh):
        src, i = ctx.src, ctx.i
        (k, (a, b), _), (B, N, d) = src.plan[i], src.shape
        if src.dq is None:                                                  # the first backward Push (i = L)
            if src.done and src.taken():
                raise RuntimeError("DAR: a later forward has taken this graph's slot buffers; backward it before")
            src.dh = src.buffer("dh", src.v.shape, src.v.dtype) if src.dh is None else src.dh
            src.dq = torch.zeros_like(src.q)
        src.dh[i] = dh.reshape(B * N, d)                                    # reader l = i+1 (the first of v_i's)
        v, s, r = src.v[k], src.s[a:b, k], src.r[k]                         # (T, d), (R, T), (T,)
        dh = src.dh[a:b]                                                    # dL/dh_l of its readers, (R, T, d)
        alpha = src.alpha[a:b, k]                                           # alpha_{i->l}, (R, T)
        vdh, src.hdh[i] = source_dots(dh, src.vh[k])                        # v_i . dh_l, and h_l . dh_l for l = i+1
        ds = alpha * (vdh - src.hdh[a:b])                                   # dL/ds_{i->l}
        dv = weighted_sum(alpha, dh, torch.empty_like(v))                   # sum_l alpha_{i->l} dL/dh_l
        # s_l = (v . q_l) r with r = (|v|^2 / d + eps)^(-1/2):  ds_l/dv = r q_l - s_l r^2 v / d
        c = (ds * s).sum(0) * r.square() / d
        dv.addcmul_(v, -c.to(v.dtype).unsqueeze(-1))
        dsr = (ds * r).to(v.dtype).view(-1, B, N)                           # (R, B, N)
        dv = dv.view(B, N, d).baddbmm_(dsr.permute(1, 2, 0), src.q[:, a:b].to(v.dtype))   # + r sum_l ds_l q_l
        src.dq[:, a:b] += dsr.transpose(0, 1) @ v.view(B, N, d)             # dq_l = sum_tokens ds_l r v
        if i > 0:
            return dv, None, None, None
        dq, src.dq, src.done = src.dq, None, True                           # v_0 is the last source to finish
        return dv, dq, None, None


# ----------------------------------------------------------------------------------------------------
# The DiT, with residual or DAR routing
# ----------------------------------------------------------------------------------------------------

class DiT(nn.Module):
    """Diffusion transformer (adaLN-Zero) predicting the flow-matching velocity; routing "residual" or "dar"."""

    def __init__(self, input_size=32, patch_size=2, in_channels=3, hidden_size=384, depth=12, num_heads=6,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=10, learn_sigma=False, routing="dar",
                 dar_query="static_t", dar_chunk=4):
        super().__init__()
        if routing not in ("residual", "dar"):
            raise ValueError(f"routing must be 'residual' or 'dar', got {routing!r}")
        if dar_query not in ("static", "static_t", "dynamic"):
            raise ValueError(f"dar_query must be 'static', 'static_t' or 'dynamic', got {dar_query!r}")
        if not isinstance(dar_chunk, int) or dar_chunk < 1:
            raise ValueError(f"dar_chunk must be an integer >= 1, got {dar_chunk!r}")
        if input_size % patch_size != 0:
            raise ValueError(f"input_size {input_size} must be divisible by patch_size {patch_size}")
        if hidden_size % num_heads != 0:
            raise ValueError(f"hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.num_classes, self.class_dropout_prob = num_classes, class_dropout_prob
        self.routing, self.dar_query, self.dar_chunk = routing, dar_query, dar_chunk
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
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for p in (self.final_layer.adaLN_modulation[-1].weight, self.final_layer.adaLN_modulation[-1].bias,
                  self.final_layer.linear.weight, self.final_layer.linear.bias):
            nn.init.zeros_(p)

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
        h0 = self.x_embedder(x) + self.pos_embed                   # v_0 = h_0: patches + positions
        t_emb = self.t_embedder(t)
        c = t_emb + self.y_embedder(y)                             # adaLN conditioning
        if self.routing == "residual":
            h = h0
            for block in self.blocks:
                h = block(h, c)                                    # h_{l+1} = h_l + v_l
        else:
            h = self.forward_dar(h0, c, t_emb)
        out = self.unpatchify(self.final_layer(h, c))
        return out[:, :self.in_channels]                           # learn_sigma: drop the variance channels (SiT)

    def forward_dar(self, h0, c, t_emb):
        """DAR: every sublayer input (and the final layer's) is a fresh softmax mixture of earlier outputs."""
        router = self.router
        router.alpha = []
        q = router.static_queries(t_emb)                           # (B, L+1, d) or None for dynamic queries
        if q is None or torch.compiler.is_compiling():
            src = Sources(router, q)                               # as written (the compiler fuses the sums)
        else:
            src = SlotSources(router, h0.shape, q, t_emb.dtype)    # the same sums, fast in eager mode
        h = src.push(h0)                                           # v_0 = h_0 (each key normalised once); h_1
        for block in self.blocks:
            for f in block.sublayers(c):                           # attention, then MLP
                h = src.push(f(h))                                 # v_l = f_l(h_l; t); h_{l+1} = sum_i alpha_i v_i
        return h                                                   # h_{L+1}: the dedicated final aggregator's

    def routing_weights(self):
        """The alpha_{i->l} of the last forward (router.record_alpha must be True): a list over readers of
        (B, N, |S_l|) tensors, with the source indices of each reader in router.sources."""
        return self.router.alpha


def residual_to_dar(model, dar_query="static_t", dar_chunk=1):
    """A DAR model carrying a residual DiT's weights (router fresh, zero queries). With dar_chunk=1 it computes
    the same function as the residual model at the start (uniform weights = residual stream / |S_l|, and
    every consumer starts with a scale-invariant LayerNorm)."""
    config = dict(model.config, routing="dar", dar_query=dar_query, dar_chunk=dar_chunk)
    dar = DiT(**config).to(next(model.parameters()).device)
    missing, unexpected = dar.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("router.") for k in missing), (missing, unexpected)
    return dar


# ----------------------------------------------------------------------------------------------------
# Flow matching (SiT's linear interpolant; t = 0 noise, t = 1 data)
# ----------------------------------------------------------------------------------------------------

def check_labels(y, num_classes):
    """ValueError unless every label is in [0, num_classes] (num_classes itself is the null class)."""
    if y.dtype not in (torch.int64, torch.int32) or (y.numel() and (y.min() < 0 or y.max() > num_classes)):
        raise ValueError(f"labels must be integers in [0, {num_classes}] ({num_classes} = null class)")


def flow_matching_loss(model, x1, y, t=None, x0=None, generator=None, t_sampling="uniform", reduction="mean"):
    """|| v(x_t, t, y) - (x1 - x0) ||^2 with x_t = t x1 + (1-t) x0; label dropout for CFG when model.training."""
    if t_sampling not in ("uniform", "logit_normal"):
        raise ValueError(f"t_sampling must be 'uniform' or 'logit_normal', got {t_sampling!r}")
    check_labels(y, model.num_classes)
    B, dev = x1.shape[0], x1.device
    if t is None:
        if t_sampling == "uniform":
            t = torch.rand(B, device=dev, generator=generator)                       # t ~ U(0, 1)
        else:
            t = torch.sigmoid(torch.randn(B, device=dev, generator=generator))       # t ~ logit-normal(0, 1)
    if x0 is None:
        x0 = torch.randn(x1.shape, device=dev, generator=generator)                  # noise at t = 0
    if model.training and model.class_dropout_prob > 0:
        drop = torch.rand(B, device=dev, generator=generator) < model.class_dropout_prob
        y = torch.where(drop, torch.full_like(y, model.num_classes), y)             # null class for CFG
    tb = t.view(-1, *([1] * (x1.ndim - 1)))
    xt = tb * x1 + (1 - tb) * x0                                                      # x_t = t x1 + (1-t) x0
    loss = (fp32(model(xt, t, y)) - (x1 - x0)).pow(2).flatten(1).mean(1)            # per-sample MSE
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
    """Samples from noise x0 with `steps` steps of Euler, Heun (2nd order) or an Euler-Maruyama SDE.

    velocity_fn(x, t, y) -> velocity, t of shape (B,): a DiT or any analytic field. The SDE
    dx = [v + w(t)/2 * score] dt + sqrt(w(t)) dW, with w(t) = 1 - t and score(x, t) = -(x - t v) / (1 - t)
    for the linear path, has the same marginals as the ODE; its last step is deterministic.
    """
    if method not in ("euler", "heun", "sde"):
        raise ValueError(f"method must be 'euler', 'heun' or 'sde', got {method!r}")
    num_classes = getattr(velocity_fn, "num_classes", None)
    if null_class is None:
        null_class = num_classes
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
            x_pred = x + dt * vt
            x = x + dt / 2 * (vt + fp32(v(x_pred, t + dt, y)))                # trapezoid on v
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
    """Registers hooks that collect z_k, the state each block k hands on: the input of the next block's first
    LayerNorm, and for the last block the final layer's (the block output with residual routing, the aggregated
    input of block k+1 or the final aggregator's output with DAR). Returns (list filled by the next forward, a
    function that removes the hooks)."""
    states = []
    norms = [block.norm1 for block in model.blocks[1:]] + [model.final_layer.norm_final]
    hooks = [norm.register_forward_pre_hook(lambda m, args: states.append(args[0])) for norm in norms]
    return states, lambda: [h.remove() for h in hooks]


def rms(z):
    """Root-mean-square over features, averaged over batch and tokens."""
    return z.pow(2).mean(-1).sqrt().mean().item()


def flow_statistics(model, x1, y, t, x0):
    """Per block k at time t: forward RMS(z_k), gradient RMS(dL/dz_k) with L the velocity MSE, and the
    per-token cosine similarity cos(z_k, z_{k+1}) averaged over batch and tokens (one value fewer)."""
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
        model(tt.view(-1, 1, 1, 1) * x1 + (1 - tt.view(-1, 1, 1, 1)) * x0, tt, y)
        for l, alpha in enumerate(router.alpha):
            out[k, l, router.sources[l]] = alpha.float().mean((0, 1)).cpu()
    router.record_alpha = False
    return out


def gated_residual_forward(model, x, t, y, gates):
    """The residual DiT unrolled, h_l = sum_{i<l} gates[l-1, i] v_i (final layer: row L): with gates = 1 it is the
    plain forward, exactly; the gradient w.r.t. gates[l-1, i] is the counterfactual importance <v_i, dL/dh_l>."""
    c = model.t_embedder(t) + model.y_embedder(y)
    v = [model.x_embedder(x) + model.pos_embed]
    mix = lambda l: sum(gates[l - 1, i] * v[i] for i in range(l)) if l > 1 else gates[0, 0] * v[0]
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
        xt = tt.view(-1, 1, 1, 1) * x1 + (1 - tt.view(-1, 1, 1, 1)) * x0
        loss = (gated_residual_forward(model, xt, tt, y, gates) - (x1 - x0)).pow(2).mean()
        out[k] = torch.tril(torch.autograd.grad(loss, gates)[0]).cpu()      # only i < l (row l-1) exist
    return out


def ridge_r2(X_fit, t_fit, X_test, t_test, lam=1e-2):
    """R^2 on (X_test, t_test) of a ridge regression t ~ X fitted on (X_fit, t_fit), features standardised."""
    mu, sd = X_fit.mean(0), X_fit.std(0) + 1e-8
    A, B = (X_fit - mu) / sd, (X_test - mu) / sd
    w = torch.linalg.solve(A.T @ A + lam * len(A) * torch.eye(A.shape[1], dtype=A.dtype), A.T @ (t_fit - t_fit.mean()))
    residual = t_test - (B @ w + t_fit.mean())
    return (1 - residual.pow(2).sum() / (t_test - t_test.mean()).pow(2).sum()).item()


@torch.no_grad()
def timestep_probe(model, x1, y, generator):
    """How linearly readable t is from the token-pooled state at each depth: ridge R^2 per block, fitted and
    scored on disjoint halves of (image, noise, t) triples; also R^2 from the raw x_t as the reference."""
    n = len(x1) // 2
    t = torch.rand(len(x1), generator=generator).to(x1.device)
    x0 = torch.randn(x1.shape, generator=generator).to(x1.device)
    xt = t.view(-1, 1, 1, 1) * x1 + (1 - t.view(-1, 1, 1, 1)) * x0
    states, remove = block_states(model)
    model(xt, t, y)
    remove()
    score = lambda X: ridge_r2(X[:n].double().cpu(), t[:n].double().cpu(), X[n:].double().cpu(), t[n:].double().cpu())
    return dict(blocks=[score(z.mean(1)) for z in states], raw_xt=score(xt.flatten(1)))
