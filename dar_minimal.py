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
    Static queries: the scores q_l . RMSNorm_l(v_i) / sqrt(d) of all readers in one matmul, (B, N, L+1) in fp32
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

    def forward(self, l, src, q):
        """h_l = sum_{i in S_l} alpha_{i->l} v_i with alpha = softmax_i(q_l . RMSNorm(v_i) / sqrt(d)), per token."""
        idx, v, s = self.sources[l - 1], src.v, src.scores
        if q is not None:
            scores = torch.cat([s[i][..., l - 1:l] for i in idx], dim=-1)      # precomputed by key_scores
        else:
            q_l = (v[l - 1] @ self.W_q[l - 1].mT) * self.key_weight[l - 1] / math.sqrt(v[0].shape[-1])  # W_q v_{l-1}
            scores = torch.cat([fp32((v[i] * q_l).sum(-1, keepdim=True)) * s[i] for i in idx], dim=-1)
        alpha = scores.softmax(dim=-1)                                          # (B, N, |S_l|), sums to 1 per token
        if self.record_alpha:
            self.alpha.append(alpha.detach())
        if torch.compiler.is_compiling():                                       # the compiler fuses the plain sum
            return sum(alpha[..., j:j + 1].to(v[i].dtype) * v[i] for j, i in enumerate(idx))
        return src.mix(l, alpha)                                                # the same sum, from slot buffers


# ----------------------------------------------------------------------------------------------------
# Keeping the sources so that h_l = sum_i alpha_i v_i is cheap (eager mode)
#
# Summing a Python list of sources costs about 3 memory passes per source forward and 9 backward, for every
# (reader, source) pair, and autograd would keep every v_i twice (for the mixture and for the key norm).
# Instead each source is copied once, when it is produced, into a per-token slot buffer of shape (tokens, slots, d):
# one buffer for the chunk summaries c_0, c_1, ..., one per chunk for its raw outputs. Every reader's sources are
# then two contiguous slot ranges: its mixture is a multiply-and-add per slot (few slots) or one batched matmul,
# and hand-written backwards add alpha_i * dL/dh_l into a gradient buffer in place and read v_i back from its slot,
# so autograd saves no source at all. A 0-dim "token" threads through every write and read so that autograd runs
# the backward of a write only after the backwards of all the reads after it. The maths is unchanged: the tests
# compare it with the plain definition, outputs and gradients. Under torch.compile the plain sum is used instead
# (see DepthRouter) and fused by the compiler. Measured: README, Cost.
# ----------------------------------------------------------------------------------------------------

class SlotBuffer:
    """Per-token slots (T, K, d) holding copies of sources, and (made in backward) the gradients that readers add."""

    def __init__(self, tokens, slots, d, dtype, device):
        self.data = torch.empty(tokens, slots, d, dtype=dtype, device=device)   # each slot is written before any read
        self.grad, self.filled = None, 0                                        # grad[:, :filled] has been written

    def add_grad(self, alpha, dh):
        """grad[:, i] += alpha[:, i] * dh for slots i < alpha.shape[1] (a first gradient is written, not added)."""
        n, k = alpha.shape[1], min(alpha.shape[1], self.filled)
        if self.grad is None:
            self.grad = torch.empty_like(self.data)
        self.grad[:, :k].addcmul_(alpha[:, :k, None], dh)
        torch.mul(alpha[:, k:n, None], dh, out=self.grad[:, k:n])
        self.filled = max(self.filled, n)

    def slot_grad(self, slot):
        """dL/d(slot) summed over all its readers, (T, d)."""
        return self.grad[:, slot] if slot < self.filled else torch.zeros_like(self.data[:, slot])


class AddSource(torch.autograd.Function):
    """A new source v_i: copied into buffer[:, slot], its key scores computed (key_scores). Returns the scores and a
    token for later reads. The backward reads v_i back from the slot, so autograd never keeps v_i itself."""

    @staticmethod
    def forward(ctx, v_i, q, token, buffer, slot):
        buffer.data[:, slot].copy_(v_i.reshape(-1, v_i.shape[-1]))
        scores, r = key_scores(buffer.data[:, slot].view(v_i.shape), q)        # the slot's copy: as backward sees it
        ctx.save_for_backward(q, scores, r)
        ctx.buffer, ctx.slot, ctx.shape = buffer, slot, v_i.shape
        return scores, token.new_empty(())

    @staticmethod
    def backward(ctx, ds, _):
        q, s, r = ctx.saved_tensors
        v = ctx.buffer.data[:, ctx.slot].view(ctx.shape)
        # s_l = (v . q_l) r with r = (|v|^2 / d + eps)^(-1/2):  ds_l/dv = r q_l - s_l r^2 v / d  (dynamic: s = r, no q)
        c = (ds * s).sum(-1, keepdim=True) * r.square() / v.shape[-1]
        dv = torch.addcmul(ctx.buffer.slot_grad(ctx.slot).view(ctx.shape), v, -c.to(v.dtype))  # readers' - c v
        if q is None:
            return dv, None, None, None, None
        dsr = (ds * r).to(v.dtype)                                              # (B, N, L+1)
        dv.baddbmm_(dsr, q.to(v.dtype))                                         # + r sum_l ds_l q_l
        return dv, (dsr.mT @ v).to(q.dtype), None, None, None                   # dq_l = sum_tokens ds_l r v


SUM_SLOTS = {"cpu": 3, "cuda": 4}   # MixSlots multiplies and adds slot by slot up to this many slots, beyond: bmm


class MixSlots(torch.autograd.Function):
    """h = alpha_c . summaries[:, :n] + alpha_r . chunk[:, :m] per token, from and into slot buffers."""

    @staticmethod
    def forward(ctx, alpha_c, alpha_r, token, summaries, chunk):
        ctx.save_for_backward(alpha_c, alpha_r)
        ctx.buffers = [(summaries, alpha_c.shape[1]), (chunk, alpha_r.shape[1])]
        h = None
        for alpha, (buffer, n) in zip((alpha_c, alpha_r), ctx.buffers):
            if n:
                h = MixSlots.weighted_sum(alpha.to(buffer.data.dtype), buffer.data[:, :n], h)    # (T, d)
        return h

    @staticmethod
    def use_bmm(slots, n):
        """Whether a product over n slots runs as one bmm (else slot by slot); measured in README, Cost."""
        # bmm reads each slot once, but both the CPU's bmm (below 4 slots) and a GPU's cuBLAS run these thin
        # (1 x n) @ (n x d) products slowly: few slots are cheaper one at a time.
        return n > SUM_SLOTS.get(slots.device.type, 4)

    @staticmethod
    def weighted_sum(alpha, slots, h=None):
        """h + sum_i alpha[:, i] slots[:, i] for alpha (T, n) and slots (T, n, d); h (T, d) or None."""
        if MixSlots.use_bmm(slots, alpha.shape[1]):
            s = torch.bmm(alpha.unsqueeze(1), slots).squeeze(1)
            return s if h is None else h.add_(s)
        for i in range(alpha.shape[1]):
            h = slots[:, i] * alpha[:, i:i + 1] if h is None else h.addcmul_(slots[:, i], alpha[:, i:i + 1])
        return h

    @staticmethod
    def backward(ctx, dh):
        grads = []
        for alpha, (buffer, n) in zip(ctx.saved_tensors, ctx.buffers):
            if n == 0:
                grads.append(torch.zeros_like(alpha))
                continue
            dh_, v = dh.to(buffer.data.dtype).unsqueeze(1), buffer.data[:, :n]                  # (T, 1, d), (T, n, d)
            if MixSlots.use_bmm(v, n):
                dalpha = torch.bmm(v, dh_.mT).squeeze(-1)
            else:
                dalpha = (v * dh_).sum(-1)
            grads.append(dalpha.to(alpha.dtype))                                                # dL/dalpha_i = v_i . dh
            buffer.add_grad(alpha.to(dh_.dtype), dh_)                                           # dL/dv_i += alpha_i dh
        return grads[0], grads[1], None, None, None


class Sources:
    """The sources v_0, v_1, ... of one DAR forward: their key scores, and their copies in slot buffers."""

    def __init__(self, router, v0, q, dtype):
        self.router, self.q, self.v, self.scores = router, q, [], []
        self.L, self.S, T, d = router.num_sublayers, router.chunk, v0.shape[0] * v0.shape[1], v0.shape[-1]
        self.num_chunks = -(-self.L // self.S)
        self.new_buffer = lambda slots: SlotBuffer(T, slots, d, dtype, v0.device)
        self.summaries = self.new_buffer(self.num_chunks)                   # c_0 .. c_{N-1}
        self.chunks = []                                                    # raw outputs, one buffer per chunk
        self.token = v0.new_zeros(())
        self.add(v0)

    def slot_for(self, i):
        """The one slot that keeps v_i: the summary slot of c_n = v_{nS}, else a raw slot (opening a chunk's buffer)."""
        if i == 0:
            return self.summaries, 0                                        # c_0 = v_0
        n, j = (i - 1) // self.S + 1, (i - 1) % self.S + 1                   # v_i is the j-th output of chunk n
        last_chunk = n == self.num_chunks
        if j == 1:                                                          # raw slots that some reader will read
            self.chunks.append(self.new_buffer(self.L - (n - 1) * self.S if last_chunk else self.S - 1))
        if j == self.S and not last_chunk:
            return self.summaries, n                                        # c_n = v_{nS}
        return self.chunks[n - 1], j - 1

    def add(self, v_i):
        """Append source v_i: its key scores, and (eager) its copy in its slot."""
        keep = self.q is None or torch.compiler.is_compiling()             # only these read v_i itself again
        self.v.append(v_i if keep else None)
        if torch.compiler.is_compiling():                                   # no buffers in compiled graphs
            return self.scores.append(key_scores(v_i, self.q)[0])
        scores, self.token = AddSource.apply(v_i, self.q, self.token, *self.slot_for(len(self.v) - 1))
        self.scores.append(scores)

    def mix(self, l, alpha):
        """sum_i alpha_i v_i over S_l: summaries c_0..c_{n-1} first, then the raw outputs of chunk n so far."""
        n = (min(l, self.L) - 1) // self.S + 1
        B, N, K = alpha.shape
        alpha = alpha.reshape(B * N, K)
        chunk = self.chunks[n - 1] if K > n else None
        h = MixSlots.apply(alpha[:, :n], alpha[:, n:], self.token, self.summaries, chunk)
        return h.view(B, N, -1)


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
        src = Sources(router, h0, q, dtype=t_emb.dtype)            # v_0 = h0; each key is normalised once
        for block in self.blocks:
            for f in block.sublayers(c):                           # attention, then MLP
                h = router(len(src.v), src, q)                     # h_l = sum_i alpha_{i->l}(t) v_i
                src.add(f(h))                                      # v_l = f_l(h_l; t)
        return router(len(src.v), src, q)                          # the dedicated final aggregator

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
    """Registers hooks that collect z_k, the state each block k hands on: the block output (residual), or the
    aggregated input of block k+1 and, for the last block, the final aggregator's output (DAR). Returns
    (list filled by the next forward, a function that removes the hooks)."""
    states = []
    if model.routing == "residual":
        hooks = [b.register_forward_hook(lambda m, i, out: states.append(out)) for b in model.blocks]
    else:
        readers = set(range(3, 2 * len(model.blocks), 2)) | {2 * len(model.blocks) + 1}   # inputs of blocks 2..D, final
        hooks = [model.router.register_forward_hook(lambda m, i, out: states.append(out) if i[0] in readers else None)]
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
