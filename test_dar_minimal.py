"""Tiny CPU tests that prove the maths of dar_minimal.py (and, below, the plumbing of train_cifar.py)."""
import math

import pytest
import torch

import dar_minimal
from dar_minimal import QUERIES, DiT, chunk_sources, flow_matching_loss, guided, residual_to_dar, sample

TINY = dict(input_size=8, patch_size=2, hidden_size=32, depth=3, num_heads=4)


def randomize(model, std=0.3, seed=0):
    """Replace every trainable weight by N(0, std^2) so that gates, queries and e(t) are all non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return model


def inputs(B=4, C=3, H=8, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, C, H, H, generator=g, dtype=dtype), torch.rand(B, generator=g, dtype=dtype),
            torch.randint(0, 10, (B,), generator=g))


# ---------------------------------------------------------------------------------------------- shapes

@pytest.mark.parametrize("routing,query,chunk", [("residual", "static_t", 4)] +
                         [("dar", q, S) for q in QUERIES for S in (1, 2, 4, 6, 9)])  # 4: does not divide L=6; >= L
def test_output_shape_every_variant(routing, query, chunk):
    model = randomize(DiT(**TINY, routing=routing, dar_query=query, dar_chunk=chunk))
    x, t, y = inputs()
    assert model(x, t, y).shape == x.shape


@pytest.mark.parametrize("routing", ["residual", "dar"])
def test_learn_sigma_and_other_sizes(routing):
    model = randomize(DiT(input_size=12, patch_size=3, in_channels=4, hidden_size=24, depth=2, num_heads=2,
                          learn_sigma=True, routing=routing))
    assert model.final_layer.linear.out_features == 3 * 3 * 8      # twice the channels, as in DiT/SiT
    x, t, y = inputs(C=4, H=12)
    assert model(x, t, y).shape == x.shape                          # variance channels dropped, as SiT does


# ---------------------------------------------------------------------------------------------- init

@pytest.mark.parametrize("routing,query", [("residual", "static")] + [("dar", q) for q in QUERIES])
def test_output_is_exactly_zero_at_init(routing, query):
    x, t, y = inputs()
    assert torch.equal(DiT(**TINY, routing=routing, dar_query=query)(x, t, y), torch.zeros_like(x))


@pytest.mark.parametrize("query", QUERIES)
def test_initial_routing_weights_are_uniform(query):
    model = DiT(**TINY, dar_query=query, dar_chunk=2)
    with torch.no_grad():                                            # make sublayer outputs non-zero, queries stay 0
        for block in model.blocks:
            block.adaLN_modulation[-1].bias.normal_()
    model.router.record_alpha = True
    model(*inputs())
    for alpha in model.router.alpha:
        assert torch.allclose(alpha, torch.full_like(alpha, 1 / alpha.shape[-1]))


# ---------------------------------------------------------------------------------------------- the chunk rule

def test_chunk_rule_hand_worked():
    # depth 3 -> L = 6 sublayers; readers 1..6 and the final aggregator (7)
    assert [chunk_sources(l, 6, 2) for l in range(1, 8)] == \
        [[0], [0, 1], [0, 2], [0, 2, 3], [0, 2, 4], [0, 2, 4, 5], [0, 2, 4, 5, 6]]
    assert [chunk_sources(l, 6, 4) for l in range(1, 8)] == \
        [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3], [0, 4], [0, 4, 5], [0, 4, 5, 6]]
    dense = [list(range(l)) for l in range(1, 8)]
    assert [chunk_sources(l, 6, 1) for l in range(1, 8)] == dense     # S = 1: every earlier output
    assert [chunk_sources(l, 6, 6) for l in range(1, 8)] == dense     # one chunk holds everything
    assert [chunk_sources(l, 6, 50) for l in range(1, 8)] == dense


@pytest.mark.parametrize("query,chunk", [(q, S) for q in QUERIES for S in (2, 4)])
def test_routing_weights_are_a_distribution_over_the_chunk_sources(query, chunk):
    model = randomize(DiT(**TINY, dar_query=query, dar_chunk=chunk))
    model.router.record_alpha = True
    model(*inputs())
    alphas = model.router.alpha
    assert len(alphas) == 7
    for l, alpha in enumerate(alphas, start=1):
        assert alpha.shape == (4, 16, len(chunk_sources(l, 6, chunk)))
        assert (alpha >= 0).all()
        assert torch.allclose(alpha.sum(-1), torch.ones(4, 16), atol=1e-6)


# ---------------------------------------------------------------------------------------------- equivalence

@pytest.mark.parametrize("query", [q for q in QUERIES if q != "static_t_embed"])
def test_zero_query_dense_dar_equals_residual(query):
    """Uniform weights give h_l = (residual stream) / l, and every consumer starts with a LayerNorm."""
    residual = randomize(DiT(**TINY, routing="residual")).double()
    dar = residual_to_dar(residual, dar_query=query, dar_chunk=1).double()
    x, t, y = inputs(dtype=torch.float64)
    a, b = residual(x, t, y), dar(x, t, y)
    assert a.norm() > 1
    assert (a - b).norm() / a.norm() < 1e-4


def plain_dar_forward(model, x, t, y):
    """DAR as the method page writes it, nothing folded or computed once per source: the oracle for dar_minimal."""
    router, d = model.router, model.pos_embed.shape[-1]
    t_emb = model.t_embedder(t)
    c = t_emb + model.y_embedder(y)
    v = [model.x_embedder(x) + model.pos_embed]

    def read(l):                                                      # h_l = sum_i alpha_{i->l} v_i
        g = router.key_weight[l - 1]
        if router.query == "dynamic":
            q = v[l - 1] @ router.W_q[l - 1].T                        # per token
        else:
            e = {"static_t": router.e(t_emb) if router.query == "static_t" else 0, "static_t_embed": t_emb}
            q = router.w[l - 1] + e.get(router.query, 0)
            q = q.reshape(-1, 1, d) if q.ndim == 2 else q
        keys = [v_i / torch.sqrt(v_i.pow(2).mean(-1, keepdim=True) + 1e-6) * g for v_i in
                (v[i] for i in router.sources[l - 1])]                 # RMSNorm with its learnable weight
        alpha = torch.stack([(q * k).sum(-1) / math.sqrt(d) for k in keys], -1).softmax(-1)
        return sum(alpha[..., j:j + 1] * v[i] for j, i in enumerate(router.sources[l - 1]))
    for block in model.blocks:
        for f in block.sublayers(c):
            v.append(f(read(len(v))))
    return model.unpatchify(model.final_layer(read(len(v)), c))[:, :model.in_channels]


@pytest.mark.parametrize("query,chunk", [(q, S) for q in QUERIES for S in (1, 2, 4, 5, 9)])
def test_aggregation_equals_the_plain_definition_with_gradients(query, chunk):
    model = randomize(DiT(**TINY, dar_query=query, dar_chunk=chunk)).double()
    x, t, y = inputs(dtype=torch.float64)
    out = model(x, t, y)
    ref = plain_dar_forward(model, x, t, y)
    assert (out - ref).norm() / ref.norm() < 1e-10
    w = torch.randn_like(out)
    grads = torch.autograd.grad((out * w).sum(), list(model.parameters())[1:])   # all but the fixed pos_embed
    ref_grads = torch.autograd.grad((ref * w).sum(), list(model.parameters())[1:])
    for (name, _), g, r in zip(list(model.named_parameters())[1:], grads, ref_grads):
        assert (g - r).norm() <= 1e-8 * (r.norm() + 1e-12), name


@pytest.mark.parametrize("query,chunk", [("static_t", 2), ("dynamic", 3)])
def test_router_gradients_by_finite_differences(query, chunk):
    """The router alone, sources fed in directly: autograd through keys() and forward() against finite differences."""
    g = torch.Generator().manual_seed(0)
    L, d = 5, 8
    router = randomize(dar_minimal.DepthRouter(d, L, query, chunk)).double()
    v = [torch.randn(2, 3, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(L + 1)]
    t_emb = torch.randn(2, d, generator=g, dtype=torch.float64, requires_grad=True)

    def run(t_emb, *v):
        q = router.queries(t_emb)
        keys = [router.keys(v_i, q) for v_i in v]
        return torch.stack([router(l, v, keys) for l in range(1, L + 2)])   # h_1 .. h_{L+1}
    assert torch.autograd.gradcheck(run, (t_emb, *v))


def test_bf16_autocast_stays_within_bf16_rounding_of_fp32():
    """bf16 autocast (as on a GPU) on the CPU: scores and softmax run in fp32; forward and gradients stay close."""
    model = randomize(DiT(**TINY, dar_chunk=2), std=0.2)
    x, t, y = inputs()

    def run(bf16):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x, t, y)
        out.float().square().mean().backward()
        return out.float(), [p.grad.clone() for p in model.parameters() if p.grad is not None]
    (low, low_grads), (ref, ref_grads) = run(True), run(False)
    assert (low - ref).norm() / ref.norm() < 0.05
    for a, b in zip(low_grads, ref_grads):
        assert (a - b).norm() <= 0.1 * b.norm() + 1e-6


def test_chunked_dar_differs_from_residual():
    residual = randomize(DiT(**TINY, routing="residual")).double()
    dar = residual_to_dar(residual, dar_chunk=2).double()
    x, t, y = inputs(dtype=torch.float64)
    a = residual(x, t, y)
    assert (a - dar(x, t, y)).norm() / a.norm() > 1e-3


def official_dit_keys(depth, d, p, c_out, n_cls, n_tok, c_in=3):
    """The parameter names and shapes of the official DiT/SiT checkpoints (written from their layout)."""
    keys = {"pos_embed": (1, n_tok, d), "x_embedder.proj.weight": (d, c_in, p, p), "x_embedder.proj.bias": (d,),
            "t_embedder.mlp.0.weight": (d, 256), "t_embedder.mlp.0.bias": (d,), "t_embedder.mlp.2.weight": (d, d),
            "t_embedder.mlp.2.bias": (d,), "y_embedder.embedding_table.weight": (n_cls + 1, d),
            "final_layer.linear.weight": (p * p * c_out, d), "final_layer.linear.bias": (p * p * c_out,),
            "final_layer.adaLN_modulation.1.weight": (2 * d, d), "final_layer.adaLN_modulation.1.bias": (2 * d,)}
    for i in range(depth):
        b = f"blocks.{i}."
        keys.update({b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,), b + "attn.proj.weight": (d, d),
                     b + "attn.proj.bias": (d,), b + "mlp.fc1.weight": (4 * d, d), b + "mlp.fc1.bias": (4 * d,),
                     b + "mlp.fc2.weight": (d, 4 * d), b + "mlp.fc2.bias": (d,),
                     b + "adaLN_modulation.1.weight": (6 * d, d), b + "adaLN_modulation.1.bias": (6 * d,)})
    return keys


def test_official_checkpoint_layout_loads():
    keys = official_dit_keys(depth=3, d=32, p=2, c_out=6, n_cls=10, n_tok=16)
    official = {k: torch.randn(shape) for k, shape in keys.items()}
    residual = DiT(**TINY, routing="residual", learn_sigma=True)
    assert {k: tuple(v.shape) for k, v in residual.state_dict().items()} == keys
    residual.load_state_dict(official, strict=True)
    for query in QUERIES:
        missing, unexpected = DiT(**TINY, learn_sigma=True, dar_query=query).load_state_dict(official, strict=False)
        assert not unexpected and missing and all(k.startswith("router.") for k in missing)


def test_timestep_embedding_is_sits():
    from dar_minimal import TimestepEmbedder, sincos_pos_embed_2d
    t = torch.tensor([0.0, 0.7])
    emb = TimestepEmbedder.sinusoidal(t, 256)
    assert torch.equal(emb[0], torch.cat([torch.ones(128), torch.zeros(128)]))       # [cos, sin] at t = 0
    k = 5
    assert torch.isclose(emb[1, k], torch.tensor(math.cos(0.7 * 10000 ** (-k / 128))))  # t not rescaled
    assert torch.isclose(emb[1, 128 + k], torch.tensor(math.sin(0.7 * 10000 ** (-k / 128))))
    pos = sincos_pos_embed_2d(8, 4)                                  # token 6 = row 1, column 2
    assert torch.allclose(pos[6, :4], torch.tensor([math.sin(2), math.sin(2 / 100), math.cos(2), math.cos(2 / 100)]))
    assert torch.allclose(pos[6, 4:], torch.tensor([math.sin(1), math.sin(1 / 100), math.cos(1), math.cos(1 / 100)]))


# ---------------------------------------------------------------------------------------------- the queries

def alphas_of(model, x, t, y):
    model.router.record_alpha = True
    with torch.no_grad():
        model(x, t, y)
    return model.router.alpha


def router_alpha(model, v, t):
    """The weights every reader of `model` gives fixed sources v at time t (keys fixed, only q(t) may move)."""
    router = model.router
    q = router.queries(model.t_embedder(t))
    keys = [router.keys(v_i, q) for v_i in v]
    router.record_alpha, router.alpha = True, []
    for l in range(1, len(v) + 1):
        router(l, v, keys)                                            # h_l from v_0 .. v_{l-1}
    return router.alpha


@pytest.mark.parametrize("query,depends_on_t", [("static", False), ("static_t", True), ("static_t_embed", True)])
def test_static_weights_ignore_t_and_static_t_weights_follow_t(query, depends_on_t):
    model = randomize(DiT(**TINY, dar_query=query, dar_chunk=1))
    v = [torch.randn(2, 16, 32) for _ in range(7)]                    # fixed sources v_0 .. v_6
    a0, a1 = router_alpha(model, v, torch.zeros(2)), router_alpha(model, v, torch.ones(2))
    if depends_on_t:
        assert max((p - q).abs().max() for p, q in zip(a0, a1)) > 1e-2
    else:
        assert all(torch.equal(p, q) for p, q in zip(a0, a1))


@pytest.mark.parametrize("query", ["static_t", "static_t_embed"])
def test_static_t_starts_as_static(query):
    model = DiT(**TINY, dar_query=query)
    with torch.no_grad():
        model.router.w.normal_()
    q0 = model.router.queries(model.t_embedder(torch.zeros(2)))
    q1 = model.router.queries(model.t_embedder(torch.ones(2)))
    assert torch.equal(q0, q1)                                        # e(t) = 0 at init


def test_static_t_embed_is_the_papers_wording_no_new_parameters_and_one_zeroed_layer():
    """e(t) is the t-embedder's own output: static+t costs nothing over static, and the DAR arm starts from the
    residual arm's weights except the t-embedder's last layer, zeroed so that e(t) = 0."""
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(DiT(**TINY, dar_query="static_t_embed")) == count(DiT(**TINY, dar_query="static"))
    torch.manual_seed(3)
    residual = DiT(**TINY, routing="residual").state_dict()
    torch.manual_seed(3)
    dar = DiT(**TINY, routing="dar", dar_query="static_t_embed").state_dict()
    differ = {k for k in residual if not torch.equal(residual[k], dar[k])}
    assert differ == {"t_embedder.mlp.2.weight"}                       # (its bias starts at zero in both)
    assert not dar["t_embedder.mlp.2.weight"].any() and not dar["t_embedder.mlp.2.bias"].any()
    with pytest.raises(ValueError, match="static_t_embed"):
        residual_to_dar(DiT(**TINY, routing="residual"), dar_query="static_t_embed")


@pytest.mark.parametrize("query,reaches", [("static", False), ("static_t", True), ("static_t_embed", True)])
def test_the_routing_gradient_reaches_the_t_embedder_through_e_of_t(query, reaches):
    """Scores of a fixed source: their gradient reaches the t-embedder through q_l(t) = w_l + e(t), or not at all."""
    model = randomize(DiT(**TINY, dar_query=query, dar_chunk=2))
    g = torch.Generator().manual_seed(0)
    scores = model.router.keys(torch.randn(2, 16, 32, generator=g), model.router.queries(model.t_embedder(torch.rand(2))))
    (scores * torch.randn(scores.shape, generator=g)).sum().backward()
    grad = model.t_embedder.mlp[-1].weight.grad
    assert (grad is not None and grad.abs().sum() > 0) == reaches


def test_dynamic_weights_depend_on_the_input():
    model = randomize(DiT(**TINY, dar_query="dynamic"))
    x, t, y = inputs()
    a = alphas_of(model, x, t, y)
    b = alphas_of(model, x.flip(0), t, y)
    assert (a[3] - b[3]).abs().max() > 1e-3
    assert a[3].std(dim=1).max() > 1e-3                               # and differ between tokens


# ---------------------------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("routing,query", [("residual", "static")] + [("dar", q) for q in QUERIES])
def test_every_parameter_gets_a_finite_nonzero_gradient(routing, query):
    model = randomize(DiT(**TINY, routing=routing, dar_query=query, dar_chunk=2))
    x, t, y = inputs()
    flow_matching_loss(model, x, y).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_routing_weights_read_out_are_those_of_the_forward(monkeypatch):
    """Rebuild the final aggregator's input from the read-out weights and check the model's output."""
    model = randomize(DiT(**TINY, dar_query="static_t", dar_chunk=2)).double()
    x, t, y = inputs(dtype=torch.float64)
    sources, keys = [], model.router.keys
    monkeypatch.setattr(model.router, "keys", lambda v_i, q: (sources.append(v_i), keys(v_i, q))[1])
    model.router.record_alpha = True
    out = model(x, t, y)
    alpha = model.router.alpha[-1]
    h = sum(alpha[..., j:j + 1] * sources[i] for j, i in enumerate(model.router.sources[-1]))
    c = model.t_embedder(t) + model.y_embedder(y)
    assert torch.allclose(model.unpatchify(model.final_layer(h, c))[:, :3], out, atol=1e-10)


# ---------------------------------------------------------------------------------------------- flow matching

def test_flow_matching_loss_matches_definition():
    model = randomize(DiT(**TINY)).eval()
    x1, t, y = inputs()
    x0 = torch.randn_like(x1)
    xt = t.view(-1, 1, 1, 1) * x1 + (1 - t.view(-1, 1, 1, 1)) * x0
    expected = ((model(xt, t, y) - (x1 - x0)) ** 2).mean()
    assert torch.allclose(flow_matching_loss(model, x1, y, t=t, x0=x0), expected)
    per_sample = flow_matching_loss(model, x1, y, t=t, x0=x0, reduction="none")
    assert per_sample.shape == (4,) and torch.allclose(per_sample.mean(), expected)
    loss = flow_matching_loss(model, x1, y, t_sampling="logit_normal", generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)


# ---------------------------------------------------------------------------------------------- samplers

MU, S = 1.5, 0.5


def gaussian_velocity(x, t, y=None):
    """Exact velocity of the linear path for data ~ N(MU, S^2): E[x1 - x0 | x_t = x]."""
    t = t.view(-1, *([1] * (x.ndim - 1)))
    var = t ** 2 * S ** 2 + (1 - t) ** 2                              # Var(x_t)
    return MU + (t * S ** 2 - (1 - t)) / var * (x - t * MU)          # E[x1-x0] + Cov(x1-x0, x_t)/Var(x_t) (x - E x_t)


@pytest.mark.parametrize("method,steps,tol", [("euler", 400, 0.01), ("heun", 12, 0.01), ("sde", 400, 0.03)])
def test_samplers_recover_a_gaussian(method, steps, tol):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4000, 64, generator=g, dtype=torch.float64)
    x = sample(gaussian_velocity, x0, steps=steps, method=method, generator=g)
    assert abs(x.mean().item() - MU) / MU < tol
    assert abs(x.std().item() - S) / S < tol


def test_cfg_scale_one_is_conditional_and_zero_is_unconditional():
    model = randomize(DiT(**TINY)).eval()
    x, t, y = inputs()
    null = torch.full_like(y, 10)
    with torch.no_grad():
        assert torch.allclose(guided(model, 0.0, 10)(x, t, y), model(x, t, null), atol=1e-5)
        assert torch.allclose(guided(model, 1.0, 10)(x, t, y), model(x, t, y))
        assert torch.allclose(guided(model, 1.0 + 1e-9, 10)(x, t, y), model(x, t, y), atol=1e-5)
        v3 = guided(model, 3.0, 10)(x, t, y)
        assert torch.allclose(v3, model(x, t, null) + 3 * (model(x, t, y) - model(x, t, null)), atol=1e-4)
    a = sample(model, x, y, steps=3, cfg_scale=0.0)
    assert torch.allclose(a, sample(model, x, null, steps=3), atol=1e-5)


def test_tiny_model_overfits_a_handful_of_images():
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4, class_dropout_prob=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    x1, y = torch.rand(8, 3, 8, 8, generator=g) * 2 - 1, torch.arange(8)
    t_eval, x0_eval = torch.rand(8, generator=g), torch.randn(8, 3, 8, 8, generator=g)

    def eval_loss():
        with torch.no_grad():
            return flow_matching_loss(model, x1, y, t=t_eval, x0=x0_eval).item()
    before = eval_loss()
    for _ in range(500):
        loss = flow_matching_loss(model, x1, y, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert eval_loss() < 0.5 * before


# ---------------------------------------------------------------------------------------------- bad input

def test_bad_input_is_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="routing"):
        DiT(**TINY, routing="highway")
    with pytest.raises(ValueError, match="dar_query"):
        DiT(**TINY, dar_query="learned")
    with pytest.raises(ValueError, match="dar_chunk"):
        DiT(**TINY, dar_chunk=0)
    with pytest.raises(ValueError, match="divisible"):
        DiT(**dict(TINY, input_size=9))
    model = DiT(**TINY)
    x, t, y = inputs()
    with pytest.raises(ValueError, match=r"\(B, 3, 8, 8\)"):
        model(x[:, :2], t, y)                                         # wrong channels
    with pytest.raises(ValueError, match=r"\(B, 3, 8, 8\)"):
        model(torch.randn(4, 3, 16, 16), t, y)                        # wrong image size
    with pytest.raises(ValueError, match=r"\[0, 10\]"):
        flow_matching_loss(model, x, torch.tensor([0, 1, 2, 11]))     # label out of range
    with pytest.raises(ValueError, match=r"\[0, 10\]"):
        flow_matching_loss(model, x, torch.tensor([0, -1, 2, 3]))
    with pytest.raises(ValueError, match=r"\[0, 10\]"):
        sample(model, x, torch.tensor([0, 1, 2, 12]), steps=1)
    with pytest.raises(ValueError, match="method"):
        sample(model, x, y, steps=1, method="rk4")
    with pytest.raises(ValueError, match="steps a positive integer"):
        sample(model, x, y, steps=0)                                  # would return the noise unchanged
    with pytest.raises(ValueError, match="depth >= 1"):
        DiT(**dict(TINY, depth=0))
    with pytest.raises(ValueError, match="converts a residual DiT"):
        residual_to_dar(model)                                        # a DAR model: its trained router would go
    with pytest.raises(ValueError, match=r"\[0, 10\]"):
        model(x, t, torch.tensor([0, 1, 2, 11]))                      # the forward itself checks its labels
    flow_matching_loss(model, x, torch.tensor([0, 1, 2, 10]))         # the null class itself is a valid label


# ================================================================================================ train_cifar.py

import json
import os

import numpy as np

import tools.compare
import tools.diagnose
import tools.sample
import train_cifar
from tools import fid
from tools.compare import compare
from tools.data import load_latents, make_shapes
from tools.grid import save_grid

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "train_cifar.py")
MICRO = ["--dataset", "shapes", "--image-size", "16", "--depth", "2", "--hidden-size", "32", "--num-heads", "2",
         "--patch-size", "4", "--batch-size", "8", "--val-size", "16", "--sample-steps", "2", "--log-every", "1",
         "--device", "cpu"]                                  # a micro model on the built-in shapes data (16 px)


def run(tmp_path, *extra, out="run"):
    """train_cifar.main on MICRO (4 steps unless extra says otherwise), returning the output folder."""
    out = str(tmp_path / out)
    train_cifar.main(MICRO + ["--steps", "4", "--out", out] + list(extra))
    return out


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_compare_end_to_end(tmp_path):
    out = run(tmp_path, "--routing", "residual,dar", "--eval-every", "2")
    for arm in ("residual", "dar"):
        for name in ("log.jsonl", "config.json", "ckpt.pt", "samples_0000002.png", "samples_0000004.png"):
            assert os.path.exists(os.path.join(out, arm, name)), (arm, name)
        evals = [r for r in read_log(os.path.join(out, arm, "log.jsonl")) if r["kind"] == "eval"]
        assert [r["step"] for r in evals] == [2, 4] and len(evals[0]["val_loss_per_t"]) == 8
    with open(os.path.join(out, "compare.json")) as f:
        c = json.load(f)
    for key in ("arms", "residual_final_val_loss", "dar_steps_to_residual_final", "speedup_in_steps", "val_t_grid"):
        assert key in c
    assert c["arms"]["dar"]["steps"] == [2, 4] and len(c["arms"]["residual"]["val_loss"]) == 2
    assert c["residual_final_val_loss"] == c["arms"]["residual"]["final_val_loss"]
    seconds = c["arms"]["dar"]["train_seconds_at_eval"]                      # training time only, growing
    assert 0 < seconds[0] < seconds[1] <= c["arms"]["dar"]["train_seconds"]
    again = tools.compare.main([out])                                       # the script, from the logs alone
    assert again["arms"] == c["arms"] and again["val_t_grid"] == c["val_t_grid"] == train_cifar.VAL_T
    with pytest.raises(ValueError, match="holds no residual arm"):
        tools.compare.main([str(tmp_path)])


def test_comparison_summary_says_what_happened(tmp_path, capsys):
    evals = lambda losses, seconds: [dict(kind="eval", step=100 * (k + 1), val_loss=v, val_loss_per_t=[v] * 8,
                                          train_seconds=seconds * (k + 1)) for k, v in enumerate(losses)]
    done = lambda seconds: [dict(kind="done", step=400, train_seconds=4 * seconds, eval_seconds=5.0)]
    ahead = compare(dict(residual=evals([0.5, 0.4, 0.3, 0.2], 10) + done(10),
                         dar=evals([0.4, 0.2, 0.15, 0.1], 12) + done(12)), str(tmp_path))
    text = capsys.readouterr().out
    assert ahead["speedup_in_steps"] == 2.0 and ahead["speedup_in_train_time"] == 40 / 24
    for line in ["final val loss: residual 0.2000, DAR 0.1000", "step ~200 of 400: 2.00x fewer steps",
                 "~24 s against the residual's 40 s: 1.67x less training time", "5 s evaluation",
                 f"picture: {tmp_path / 'compare.png'}", "need not last"]:
        assert line in text, line
    assert os.path.exists(tmp_path / "compare.png")
    behind = compare(dict(residual=evals([0.5, 0.4, 0.3, 0.2], 10) + done(10),
                          dar=evals([0.5, 0.45, 0.35, 0.25], 12) + done(12)), str(tmp_path))
    text = capsys.readouterr().out
    assert behind["speedup_in_steps"] is None and "did not reach the residual's final val loss within 400" in text
    assert "in training time: not within the residual's 40 s" in text


def test_the_learning_rate_warms_up_then_stays_or_decays_to_a_tenth():
    parse = lambda *extra: train_cifar.parse_args(["--steps", "111", "--warmup", "10", "--lr", "1e-3", *extra])
    lr = lambda args: [train_cifar.learning_rate(step, args) for step in range(args.steps)]
    constant, cosine = lr(parse()), lr(parse("--lr-schedule", "cosine"))
    assert constant[:10] == cosine[:10] == pytest.approx([k * 1e-4 for k in range(1, 11)])     # linear warm-up
    assert constant[10:] == [1e-3] * 101                                                       # DiT, SiT: constant
    assert cosine[10] == pytest.approx(1e-3) and cosine[60] == pytest.approx(0.55e-3)           # half-way: the mean
    assert cosine[-1] == pytest.approx(1e-4) and all(a > b for a, b in zip(cosine[10:], cosine[11:]))
    with pytest.raises(SystemExit):
        parse("--lr-schedule", "linear")


def test_presets_keep_evaluation_cheap_and_grids_name_their_classes(tmp_path):
    quick = train_cifar.parse_args(["--preset", "quick", "--device", "cpu"])
    assert (quick.steps, quick.eval_every, quick.val_size, quick.sample_every) == (400, 100, 200, 400)
    longer = train_cifar.parse_args(["--preset", "quick", "--steps", "1000", "--device", "cpu"])
    assert (longer.eval_every, longer.sample_every) == (250, 1000)                 # grids at the end, as the preset
    tiny = train_cifar.parse_args(["--preset", "tiny", "--steps", "1000", "--device", "cpu"])
    assert (tiny.eval_every, tiny.sample_every) == (250, 500)                        # and halfway, as the tiny preset
    from PIL import Image
    save_grid(torch.zeros(20, 3, 16, 16), str(tmp_path / "g.png"), names=["a", "b", "c", "d", "e"])
    img = Image.open(tmp_path / "g.png")
    zoom = 4                                                                # 16 + 2 px cells, at least 64 px wide
    assert img.size == ((5 * 18 + 2) * zoom, (4 * 18 + 2) * zoom + 14)


BENCH = ["--depths", "1", "2", "--modes", "eager", "--dar", "static_t:2", "dynamic:1", "--repeats", "2",
         "--image-size", "8", "--patch-size", "4", "--hidden-size", "16", "--num-heads", "2", "--batch-size", "2",
         "--device", "cpu"]


def bench_module():
    """results/bench.py, the benchmark script, imported as the module `bench`."""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    import bench
    return bench


def test_bench_writes_every_arm_with_both_ratios(tmp_path, monkeypatch):
    bench = bench_module()
    monkeypatch.setattr(bench, "peak_memory", lambda args, overrides, compiled: 2 ** 20)   # one child each: slow
    monkeypatch.setattr(bench, "others_share", lambda *a: 0.0)                    # the test machine may be busy
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    result = bench.main(BENCH + ["--out", str(tmp_path)])
    rows = {r["arm"]: r for r in result["rows"]}
    assert len(rows) == 6 and rows["d2 residual eager"]["time_ratio"] == rows["d2 residual eager"]["paired_ratio"] == 1
    assert rows["d2 dar dynamic c1 eager"]["reference"] == "d2 residual eager"
    assert all(r["paired_ratio"] > 0 and r["memory_ratio"] == 1.0 for r in rows.values())
    assert "x residual, paired" in open(os.path.join(tmp_path, "bench.md")).read()
    with pytest.raises(SystemExit):
        bench.parse_args(["--dar", "static_t"])                                 # query:chunk expected


def test_bench_refuses_a_busy_machine_unless_allowed_and_then_says_so(tmp_path, monkeypatch):
    bench = bench_module()
    monkeypatch.setattr(bench, "peak_memory", lambda args, overrides, compiled: None)
    monkeypatch.setattr(bench, "others_share", lambda *a: 0.5)                    # half the CPU went to other jobs
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    with pytest.raises(SystemExit, match="busy"):
        bench.main(BENCH + ["--no-memory", "--out", str(tmp_path)])
    assert not os.path.exists(os.path.join(tmp_path, "bench.json"))
    result = bench.main(BENCH + ["--no-memory", "--allow-busy", "--out", str(tmp_path)])
    assert result["load"]["busy"] and result["load"]["others_cpu_share"] == 0.5
    assert "BUSY machine" in open(os.path.join(tmp_path, "bench.md")).read()
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 9.0, 9.0))               # busy before it starts: refused
    with pytest.raises(SystemExit, match="load average"):
        bench.main(BENCH + ["--no-memory", "--out", str(tmp_path / "again")])


def test_bench_cpu_peak_memory_of_one_arm_in_a_child_process():
    bench = bench_module()
    # activations of 16 x 64 tokens x 128 channels (0.5 MiB each): far above the resident-size counters' noise, which
    # at BENCH's 2 x 4 tokens x 16 channels made the growth read anywhere from -32 KiB to +250 KiB
    args = bench.parse_args(["--image-size", "32", "--patch-size", "4", "--hidden-size", "128", "--num-heads", "2",
                             "--batch-size", "16", "--device", "cpu"])
    assert bench.peak_memory(args, dict(depth=1, routing="dar", dar_chunk=2), False) > 4 * 2**20


def test_the_default_chunk_size_is_one_number_in_the_model_and_the_script():
    """DiT's default chunk size (4, the paper's S for DiT-XL) is the router's and train_cifar's, for every preset."""
    import inspect
    default = inspect.signature(DiT).parameters["dar_chunk"].default
    assert default == 4
    for preset in train_cifar.PRESETS:
        assert train_cifar.parse_args(["--preset", preset, "--device", "cpu"]).dar_chunk == default
    router = DiT(**TINY, routing="dar").router                             # L = 6 sublayers
    assert router.chunk == default and router.sources == [chunk_sources(l, 6, default) for l in range(1, 8)]


def test_compile_is_the_default_on_cuda_only_and_can_be_switched(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)              # options only: no GPU is touched
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    parse = train_cifar.parse_args
    assert parse(["--device", "cuda"]).compile and not parse(["--device", "cuda", "--no-compile"]).compile
    assert not parse(["--device", "cpu"]).compile and parse(["--device", "cpu", "--compile"]).compile


def test_both_arms_start_from_the_same_weights():
    torch.manual_seed(3)
    residual = DiT(**TINY, routing="residual").state_dict()
    torch.manual_seed(3)
    dar = DiT(**TINY, routing="dar").state_dict()
    assert all(torch.equal(residual[k], dar[k]) for k in residual)


def test_validation_is_identical_for_both_arms_and_every_evaluation(tmp_path):
    args = train_cifar.parse_args(["--dataset", "shapes", "--image-size", "16", "--val-size", "16", "--device", "cpu"])
    data = train_cifar.load_data(args)
    model = randomize(DiT(input_size=16, patch_size=4, hidden_size=32, depth=2, num_heads=2)).eval()
    assert train_cifar.validation_loss(model, data, args) == train_cifar.validation_loss(model, data, args)


def test_resume_continues_exactly(tmp_path):
    straight = run(tmp_path, "--routing", "dar", "--steps", "6", "--eval-every", "3", out="straight")
    run(tmp_path, "--routing", "dar", "--steps", "3", "--eval-every", "3", out="resumed")
    resumed = run(tmp_path, "--routing", "dar", "--steps", "6", "--eval-every", "3", "--resume", out="resumed")
    losses = lambda out: [(r["step"], r["loss"]) for r in read_log(os.path.join(out, "dar", "log.jsonl"))
                          if r["kind"] == "train"]
    assert losses(straight) == losses(resumed) and len(losses(straight)) == 6
    a = torch.load(os.path.join(straight, "dar", "ckpt.pt"), weights_only=False)
    b = torch.load(os.path.join(resumed, "dar", "ckpt.pt"), weights_only=False)
    assert all(torch.equal(a["model"][k], b["model"][k]) and torch.equal(a["ema"][k], b["ema"][k]) for k in a["model"])


def test_logged_train_loss_is_the_mean_of_every_step_since_the_last_log(tmp_path):
    """Evaluations and checkpoints between two log lines check the pending losses but must not drop them."""
    losses = lambda out: [(r["step"], r["loss"]) for r in read_log(os.path.join(out, "residual", "log.jsonl"))
                          if r["kind"] == "train"]
    plain = run(tmp_path, "--routing", "residual", "--steps", "8", "--log-every", "4", "--eval-every", "8", out="a")
    busy = run(tmp_path, "--routing", "residual", "--steps", "8", "--log-every", "4", "--eval-every", "3",
               "--ckpt-every", "5", out="b")
    assert losses(plain) == losses(busy) and [s for s, _ in losses(plain)] == [4, 8]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    calls = []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = flow_matching_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) == 4 else loss
    monkeypatch.setattr(train_cifar, "flow_matching_loss", poisoned)
    with pytest.raises(FloatingPointError, match="non-finite loss at step 4"):
        run(tmp_path, "--routing", "residual", "--steps", "6", "--ckpt-every", "2", "--eval-every", "100")
    ckpt = torch.load(os.path.join(tmp_path, "run", "residual", "ckpt.pt"), weights_only=False)
    assert ckpt["step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_an_interrupted_run_resumes_with_its_training_time(tmp_path, monkeypatch):
    """The checkpoint carries the seconds spent so far, so that training times stay cumulative across a crash."""
    import time
    calls = []

    def slow_then_crash(*args, **kwargs):
        if not torch.is_grad_enabled():                                   # an evaluation: slow too
            time.sleep(0.1)
            return flow_matching_loss(*args, **kwargs)
        calls.append(1)
        time.sleep(0.3)                                                   # 0.3 s of "training" per step
        loss = flow_matching_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) == 4 else loss
    monkeypatch.setattr(train_cifar, "flow_matching_loss", slow_then_crash)
    with pytest.raises(FloatingPointError):
        run(tmp_path, "--routing", "residual", "--steps", "6", "--ckpt-every", "2", "--eval-every", "2")
    spent = torch.load(os.path.join(tmp_path, "run", "residual", "ckpt.pt"), weights_only=True)["seconds"]
    assert spent["train"] >= 0.6 and spent["eval"] >= 0.1                # two slow steps, one slow evaluation
    monkeypatch.setattr(train_cifar, "flow_matching_loss", flow_matching_loss)
    out = run(tmp_path, "--routing", "residual", "--steps", "6", "--ckpt-every", "2", "--eval-every", "2", "--resume")
    records = read_log(os.path.join(out, "residual", "log.jsonl"))
    seconds = [r["train_seconds"] for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [2, 4, 6] and seconds == sorted(seconds)
    done = [r for r in records if r["kind"] == "done"]
    assert len(done) == 1 and done[0]["train_seconds"] >= seconds[-1] >= spent["train"]
    assert done[0]["eval_seconds"] >= spent["eval"]                       # the fast evaluations after it add to it


def test_torchrun_two_gloo_processes_match_one_process_with_the_whole_batch(tmp_path):
    """2 x 4 samples per step under torchrun (DDP, gloo) = 1 x 8: same draws per sample, gradients averaged."""
    import subprocess
    import sys
    one = run(tmp_path, "--routing", "dar", "--steps", "3", "--eval-every", "3", out="one")
    argv = MICRO + ["--steps", "3", "--eval-every", "3", "--routing", "dar", "--out", str(tmp_path / "two")]
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", SCRIPT]
                       + argv, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    logs = [read_log(os.path.join(out, "dar", "log.jsonl")) for out in (one, str(tmp_path / "two"))]
    losses = [[r["loss"] for r in log if r["kind"] == "train"] for log in logs]
    assert len(losses[0]) == 3 and losses[1] == pytest.approx(losses[0], rel=1e-5)
    a, b = (torch.load(os.path.join(out, "dar", "ckpt.pt"), weights_only=True) for out in (one, str(tmp_path / "two")))
    assert all(torch.allclose(a["model"][k], b["model"][k], atol=1e-5) for k in a["model"])
    assert p.stdout.count("step 3: val loss") == 1                          # rank 0 alone evaluates and prints


def signalled_run(tmp_path, sig, launcher=(), routing="residual,dar", argv=None):
    """A real training process (MICRO, far more steps than it will take, or argv) sent sig once its first arm has logged
    a step; returns its exit code, its stderr and the first arm's checkpoint."""
    import subprocess
    import sys
    import time
    argv = (argv or MICRO + ["--steps", "100000", "--eval-every", "100000"]) + ["--routing", routing, "--out",
                                                                                 str(tmp_path / "run")]
    p = subprocess.Popen([sys.executable, *launcher, SCRIPT] + argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    log, deadline = tmp_path / "run" / routing.split(",")[0] / "log.jsonl", time.time() + 240
    while not (log.exists() and log.read_text().strip()):          # training has started: the handlers are in place
        assert p.poll() is None and time.time() < deadline, p.communicate()[1][-2000:] if p.poll() is not None else ""
        time.sleep(0.05)
    p.send_signal(sig)
    _, stderr = p.communicate(timeout=240)
    path = tmp_path / "run" / routing.split(",")[0] / "ckpt.pt"
    return p.returncode, stderr, path, torch.load(path, weights_only=True)


@pytest.mark.parametrize("sig,code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_ctrl_c_or_sigterm_checkpoints_and_the_resumed_run_is_the_same_run(tmp_path, sig, code):
    """The first signal ends the step in progress with a checkpoint and one line; the second arm is left untouched;
    --resume auto then gives the losses and weights of a run that was never stopped."""
    import signal
    rc, stderr, path, ckpt = signalled_run(tmp_path, getattr(signal, sig))
    n = ckpt["step"]
    assert rc == code, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == (f"stopped at step {n}; checkpoint written to {path}; continue with "
                                               "the same command and --resume auto")
    assert n >= 1 and not os.path.exists(tmp_path / "run" / "dar" / "ckpt.pt")     # the second arm: not started
    more = ["--steps", str(n + 3), "--eval-every", "100000"]
    run(tmp_path, "--routing", "residual,dar", "--resume", "auto", *more)
    run(tmp_path, "--routing", "residual", *more, out="straight")
    logs = [read_log(tmp_path / out / "residual" / "log.jsonl") for out in ("run", "straight")]
    losses = [[(r["step"], r["loss"]) for r in log if r["kind"] == "train"] for log in logs]
    assert [s for s, _ in losses[0]] == list(range(1, n + 4))                      # no step lost, none repeated
    assert [v for _, v in losses[0]] == pytest.approx([v for _, v in losses[1]], rel=1e-5)
    a, b = (torch.load(tmp_path / out / "residual" / "ckpt.pt", weights_only=True) for out in ("run", "straight"))
    assert all(torch.allclose(a[w][k], b[w][k], atol=1e-6) for w in ("model", "ema") for k in a["model"])
    assert os.path.exists(tmp_path / "run" / "dar" / "ckpt.pt")


def test_a_stop_between_log_lines_keeps_the_losses_of_its_steps(tmp_path, monkeypatch):
    """A checkpoint between two log lines carries the losses not yet logged, so the resumed log equals a straight one."""
    import signal
    losses = lambda out: [(r["step"], r["loss"]) for r in read_log(os.path.join(out, "residual", "log.jsonl"))
                          if r["kind"] == "train"]
    argv = ["--routing", "residual", "--steps", "8", "--log-every", "4", "--eval-every", "8"]
    straight = run(tmp_path, *argv, out="a")
    steps = []

    def sigterm_in_step_6(*args, **kwargs):
        steps.append(1)
        if len(steps) == 6:
            os.kill(os.getpid(), signal.SIGTERM)                      # as a scheduler would, in the middle of step 6
        return flow_matching_loss(*args, **kwargs)
    monkeypatch.setattr(train_cifar, "flow_matching_loss", sigterm_in_step_6)
    with pytest.raises(train_cifar.Stopped, match="stopped at step 6; .* --resume$") as e:
        run(tmp_path, *argv, out="b")
    assert e.value.signum == signal.SIGTERM
    monkeypatch.setattr(train_cifar, "flow_matching_loss", flow_matching_loss)
    resumed = run(tmp_path, *argv, "--resume", out="b")
    assert losses(straight) == losses(resumed) and [s for s, _ in losses(resumed)] == [4, 8]


def test_a_second_ctrl_c_stops_at_once_and_the_handlers_are_restored():
    import signal
    import time
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with train_cifar.StopSignals(quiet=True) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.signum == signal.SIGTERM                          # recorded, nothing raised
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_sigterm_under_torchrun_stops_every_process_and_rank_0_checkpoints(tmp_path):
    import signal
    rc, stderr, path, ckpt = signalled_run(tmp_path, signal.SIGTERM, routing="dar",
                                           launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                                     "2"))
    assert rc != 0 and stderr.count(f"stopped at step {ckpt['step']}; checkpoint written to {path}") == 1, stderr[-3000:]
    run(tmp_path, "--routing", "dar", "--steps", str(ckpt["step"] + 1), "--eval-every", "100000", "--resume")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 2-step run to be resumed with other options."""
    tmp_path = tmp_path_factory.mktemp("stream")
    return tmp_path, run(tmp_path, "--routing", "dar", "--steps", "2", "--lr-schedule", "cosine")


@pytest.mark.parametrize("option,value", [
    ("--seed", "1"), ("--batch-size", "4"), ("--lr", "0.01"), ("--lr-schedule", "constant"), ("--warmup", "2"),
    ("--ema-decay", "0.5"), ("--grad-clip", "0.5"), ("--t-sampling", "logit_normal"), ("--precision", "bf16"),
    ("--class-dropout", "0.2"), ("--dataset", "latents"), ("--image-size", "8"), ("--steps", "5")])
def test_resume_with_another_stream_option_is_refused_in_one_line(finished_run, option, value, monkeypatch):
    tmp_path, out = finished_run
    monkeypatch.setattr(train_cifar, "load_data", lambda args: pytest.fail("data loaded before the refusal"))
    log = open(os.path.join(out, "dar", "log.jsonl")).read()
    with pytest.raises(ValueError) as e:
        run(tmp_path, "--routing", "dar", "--steps", "2", "--lr-schedule", "cosine", option, value, "--resume")
    message = str(e.value)
    assert "\n" not in message and f"{option} " in message and f"(now {value}" in message.replace("0.010", "0.01")
    assert "start a new run" in message and message.count("(now") == 1
    assert open(os.path.join(out, "dar", "log.jsonl")).read() == log


def test_resume_may_change_steps_evaluation_and_logging_under_a_constant_schedule(tmp_path):
    run(tmp_path, "--routing", "dar", "--steps", "2")
    run(tmp_path, "--routing", "dar", "--steps", "3", "--eval-every", "1", "--log-every", "2", "--sample-steps", "3",
        "--cfg-scale", "2", "--resume")


def test_shapes_are_deterministic_and_classes_differ():
    x1, y1 = make_shapes(200, 16, seed=5)
    x2, y2 = make_shapes(200, 16, seed=5)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and x1.dtype == torch.uint8
    assert not torch.equal(x1, make_shapes(200, 16, seed=6)[0])
    means = torch.stack([x1[y1 == k].float().mean(0) for k in range(10)])           # class-mean images
    distances = torch.cdist(means.flatten(1), means.flatten(1))
    assert distances[~torch.eye(10, dtype=torch.bool)].min() > 100                    # every pair of classes differs
    silhouette = (x1.max(1).values > 80).float()                  # the object, whatever its colour (background <= 64)
    assert (silhouette[:, [0, -1]][:, :, [0, -1]] == 0).all()                        # it stays clear of the corners
    outlines = torch.stack([silhouette[y1 == k].mean(0) for k in range(10)]).flatten(1)
    differ = torch.cdist(outlines, outlines, p=1)                         # pixels by which class outlines differ
    assert differ[~torch.eye(10, dtype=torch.bool)].min() > 8                          # also by shape, not only colour


def test_frechet_distance_matches_the_closed_form():
    g = torch.Generator().manual_seed(0)
    R = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))[0]       # shared eigenvectors
    a, b = torch.rand(6, generator=g, dtype=torch.float64) + 0.1, torch.rand(6, generator=g, dtype=torch.float64) + 0.1
    mu1, mu2 = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    fd = fid.frechet_distance(mu1, R @ torch.diag(a) @ R.T, mu2, R @ torch.diag(b) @ R.T)
    expected = (mu1 - mu2).pow(2).sum() + (a.sqrt() - b.sqrt()).pow(2).sum()
    assert abs(fd - expected.item()) < 1e-9
    assert abs(fid.frechet_distance(mu1, R @ torch.diag(a) @ R.T, mu1, R @ torch.diag(a) @ R.T)) < 1e-9


def test_pytorch_fid_backend_with_random_weights_and_a_cached_reference(tmp_path, monkeypatch):
    inception = pytest.importorskip("pytorch_fid.inception")
    monkeypatch.setattr(inception, "fid_inception_v3",                      # its architecture, no weights download
                        lambda: inception._inception_v3(num_classes=1008, aux_logits=False, weights=None))
    net = fid.load_inception("cpu")
    feats, preds = fid.features(net, torch.rand(3, 3, 16, 16) * 2 - 1, "cpu")
    assert preds is None and feats.shape == (3, 2048) and feats.dtype == torch.float64 and torch.isfinite(feats).all()
    args = train_cifar.parse_args(["--dataset", "shapes", "--image-size", "16", "--fid-samples", "6",
                                   "--out", str(tmp_path), "--device", "cpu"])
    data = dict(train_x=make_shapes(20, 16, 0)[0])
    _, mu, cov = fid.setup(data, args)
    assert mu.shape == (2048,) and cov.shape == (2048, 2048) and os.path.exists(args.fid_reference)
    monkeypatch.setattr(fid, "features", lambda *a, **k: pytest.fail("the cache was not used"))
    assert torch.equal(fid.setup(data, args)[1], mu)


def test_fid_without_the_package_or_its_weights_is_one_line_and_training_goes_on(tmp_path, monkeypatch, capsys):
    import sys
    import urllib.error
    inception = pytest.importorskip("pytorch_fid.inception")

    def offline():
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(inception, "fid_inception_v3", offline)              # the weights cannot be downloaded
    assert fid.load_inception("cpu") is None
    assert "weights could not be loaded (URLError" in capsys.readouterr().out
    monkeypatch.setitem(sys.modules, "pytorch_fid.inception", None)          # the package is not installed
    assert fid.load_inception("cpu") is None
    assert "pip install pytorch-fid" in capsys.readouterr().out
    monkeypatch.setattr(fid, "load_inception", lambda *a: print("FID skipped: no weights offline"))
    out = run(tmp_path, "--routing", "residual", "--fid-every", "2")
    assert [r["step"] for r in read_log(os.path.join(out, "residual", "log.jsonl")) if r["kind"] == "done"] == [4]


def test_latents_dataset(tmp_path):
    x, y = torch.randn(40, 4, 8, 8), torch.randint(0, 5, (40,))
    torch.save({"x": x, "y": y}, tmp_path / "z.pt")
    np.savez(tmp_path / "z.npz", x=x.numpy(), y=y.numpy())
    for f in ("z.pt", "z.npz"):
        out = run(tmp_path, "--dataset", "latents", "--data-path", str(tmp_path / f), "--patch-size", "2",
                  "--routing", "dar", "--steps", "2", out="out_" + f)
        with open(os.path.join(out, "dar", "config.json")) as fh:
            model = json.load(fh)["model"]
        assert (model["in_channels"], model["input_size"], model["num_classes"]) == (4, 8, 5)


def image_folder(path, n=12):
    """An ImageFolder tree of n random 24 x 20 images in each of two classes (cat darker than dog)."""
    from torchvision.utils import save_image
    for k, name in enumerate(["cat", "dog"]):
        os.makedirs(path / name)
        for i in range(n):
            save_image(torch.rand(3, 20, 24) * (k + 1) / 2, path / name / f"{i}.png")
    return str(path)


def test_folder_dataset(tmp_path):
    from torchvision.utils import save_image
    image_folder(tmp_path / "imgs")
    out = run(tmp_path, "--dataset", "folder", "--data-dir", str(tmp_path / "imgs"), "--routing", "residual",
              "--steps", "2")
    with open(os.path.join(out, "residual", "config.json")) as fh:
        model = json.load(fh)["model"]
    assert (model["in_channels"], model["input_size"], model["num_classes"]) == (3, 16, 2)
    for i in range(12, 14):                                         # the folder grew: not the run's data any more
        save_image(torch.rand(3, 20, 24), tmp_path / "imgs" / "cat" / f"{i}.png")
    with pytest.raises(ValueError, match="22 training images \\(now 24\\).*start a new run"):
        run(tmp_path, "--dataset", "folder", "--data-dir", str(tmp_path / "imgs"), "--routing", "residual",
            "--steps", "3", "--resume")


# ------------------------------------------------------------------ latents end to end (tools/encode_latents.py)

from tools import encode_latents  # noqa: E402


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """A tiny random AutoencoderKL (16 px images -> 4 x 8 x 8 latents) saved as a directory, and a latents
    directory made with it from 2 x 20 images: (tmp_path, autoencoder directory, encoder arguments, latents directory)."""
    diffusers = pytest.importorskip("diffusers")
    tmp_path = tmp_path_factory.mktemp("latents")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, latent_channels=4)
    vae.save_pretrained(tmp_path / "vae")
    argv = [image_folder(tmp_path / "imgs", n=20), str(tmp_path / "z"), "--vae", str(tmp_path / "vae"),
            "--image-size", "16", "--batch-size", "5", "--workers", "0", "--device", "cpu"]
    return tmp_path, str(tmp_path / "vae"), argv, encode_latents.main(argv)


def test_adm_centre_crop():
    from PIL import Image
    image = Image.new("L", (80, 40))
    image.paste(255, (40, 0, 80, 40))                                  # right half white
    crop = np.asarray(encode_latents.center_crop(image, 16))
    assert crop.shape == (16, 16, 3)                                   # RGB, the short side 40 -> 20 (box) -> 16
    assert (crop[:, :7] == 0).all() and (crop[:, 9:] == 255).all()     # the centre: half dark, half white


def test_encoded_latents_are_the_autoencoders_scaled_posterior_mean(encoded):
    from PIL import Image
    tmp_path, vae_dir, _, z_dir = encoded
    z, y = np.load(os.path.join(z_dir, "latents.npy")), np.load(os.path.join(z_dir, "labels.npy"))
    assert z.shape == (40, 4, 8, 8) and z.dtype == np.float16 and y.tolist() == [0] * 20 + [1] * 20
    with open(os.path.join(z_dir, "latents.json")) as f:
        meta = json.load(f)
    assert (meta["done"], meta["scale"], meta["classes"], meta["autoencoder"]) == (40, 0.18215, ["cat", "dog"], vae_dir)
    vae = encode_latents.load_autoencoder(vae_dir, "cpu")
    image = encode_latents.center_crop(Image.open(tmp_path / "imgs" / "dog" / "0.png"), 16)
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        expected = vae.encode(x).latent_dist.mean[0] * 0.18215
    assert torch.allclose(torch.from_numpy(z[20]).float(), expected, rtol=1e-3, atol=1e-4)


def interrupt(z_dir, done):
    """Makes an encoded directory look stopped after `done` rows: the record says so, later rows are zero."""
    with open(z_dir / "latents.json") as f:
        meta = json.load(f)
    encode_latents.write_json(dict(meta, done=done), str(z_dir / "latents.json"))
    rows = np.lib.format.open_memmap(z_dir / "latents.npy", mode="r+")
    rows[done:] = 0
    del rows


def test_encoding_continues_where_it_stopped_and_never_overwrites(encoded, tmp_path, capsys):
    import shutil
    _, _, argv, z_dir = encoded
    shutil.copytree(z_dir, tmp_path / "z")
    whole = np.load(os.path.join(z_dir, "latents.npy"))
    interrupt(tmp_path / "z", 5)                                                # stopped after one batch
    with pytest.raises(ValueError, match="unfinished \\(5 of 40"):
        load_latents(str(tmp_path / "z"))
    encode_latents.main([argv[0], str(tmp_path / "z")] + argv[2:])
    assert "continuing" in capsys.readouterr().out
    assert np.array_equal(np.load(tmp_path / "z" / "latents.npy"), whole)
    encode_latents.main([argv[0], str(tmp_path / "z")] + argv[2:])
    assert "already complete" in capsys.readouterr().out
    with pytest.raises(ValueError, match="made otherwise \\(image_size: 16 \\(now 8\\)"):
        encode_latents.main([argv[0], str(tmp_path / "z")] + argv[2:] + ["--image-size", "8"])
    with pytest.raises(ValueError, match="not a latents directory"):
        encode_latents.main([argv[0], argv[0]] + argv[2:])              # a directory of something else
    assert np.array_equal(np.load(tmp_path / "z" / "latents.npy"), whole)


def test_posterior_samples_are_seeded_per_batch_so_a_continued_run_gives_the_same_rows(encoded, tmp_path):
    _, _, argv, z_dir = encoded
    argv = [argv[0], str(tmp_path / "z")] + argv[2:] + ["--posterior", "sample"]
    whole = np.load(os.path.join(encode_latents.main(argv), "latents.npy"))
    mean = np.load(os.path.join(z_dir, "latents.npy"))
    assert not np.array_equal(whole, mean) and np.abs(whole - mean).max() > 1e-3      # a sample, not the mean
    interrupt(tmp_path / "z", 10)                                               # stopped after two batches
    encode_latents.main(argv)
    assert np.array_equal(np.load(tmp_path / "z" / "latents.npy"), whole)


def test_training_on_a_latents_directory_equals_the_same_latents_file_and_decodes(encoded, tmp_path):
    _, vae_dir, _, z_dir = encoded
    torch.save({"x": torch.from_numpy(np.load(os.path.join(z_dir, "latents.npy"))).float(),
                "y": torch.from_numpy(np.load(os.path.join(z_dir, "labels.npy")))}, tmp_path / "z.pt")
    clf = fid.Classifier(num_classes=2, width=4)
    torch.save(dict(config=clf.config, model=clf.state_dict()), tmp_path / "clf.pt")
    common = ["--dataset", "latents", "--patch-size", "2", "--routing", "dar", "--steps", "2", "--batch-size", "4"]
    mapped = run(tmp_path, *common, "--data-path", z_dir, "--fid-every", "2", "--fid-backend", "classifier",
                 "--fid-weights", str(tmp_path / "clf.pt"), "--fid-samples", "6", out="dir")
    whole = run(tmp_path, *common, "--data-path", str(tmp_path / "z.pt"), out="file")
    logs = [read_log(os.path.join(out, "dar", "log.jsonl")) for out in (mapped, whole)]
    losses = [[(r["step"], r.get("loss"), r.get("val_loss")) for r in log if r["kind"] != "done"] for log in logs]
    assert losses[0] == losses[1] and len(losses[0]) == 4            # the same batches, the same numbers
    assert "sample_accuracy" in logs[0][-2] and "fid" not in logs[1][-2]     # decoded, measured (the file: no autoencoder)
    assert os.path.exists(os.path.join(mapped, "dar", "samples_0000002.png"))
    assert not os.path.exists(os.path.join(whole, "dar", "samples_0000002.png"))
    data = train_cifar.load_data(train_cifar.parse_args(common + ["--data-path", z_dir, "--device", "cpu"]))
    assert data["class_names"] == ["cat", "dog"] and data["decode"].autoencoder == vae_dir
    assert data["decode"](torch.zeros(3, 4, 8, 8)).shape == (3, 3, 16, 16)      # latents -> images, 2x the size
    images = np.load(tools.sample.main([os.path.join(mapped, "dar", "ckpt.pt"), "--num-samples", "3",
                                        "--sample-steps", "2", "--device", "cpu"]) + ".npz")["arr_0"]
    assert images.shape == (3, 16, 16, 3)                             # decoded by the autoencoder the run names


def test_latents_without_their_autoencoder_train_and_say_so_once(encoded, tmp_path, monkeypatch, capsys):
    import sys
    _, vae_dir, _, z_dir = encoded
    monkeypatch.setitem(sys.modules, "diffusers", None)                          # not installed
    with pytest.raises(ValueError, match="pip install diffusers"):
        encode_latents.load_autoencoder(vae_dir, "cpu")
    common = ["--dataset", "latents", "--data-path", z_dir, "--patch-size", "2", "--routing", "dar", "--steps", "2"]
    out = run(tmp_path, *common)
    assert capsys.readouterr().out.count("samples stay latents") == 1
    assert not any(f.endswith(".png") for f in os.listdir(os.path.join(out, "dar")))
    with pytest.raises(ValueError, match="pip install diffusers"):              # asked for by name: an error
        run(tmp_path, *common, "--vae", vae_dir, out="asked")
    monkeypatch.delitem(sys.modules, "diffusers")
    run(tmp_path, *common, "--vae", "none", out="none")
    assert "samples stay latents" not in capsys.readouterr().out


def test_a_latents_directory_is_checked_when_loaded(tmp_path):
    os.makedirs(tmp_path / "z")
    np.save(tmp_path / "z" / "latents.npy", np.zeros((6, 4, 2, 2), np.float16))
    with pytest.raises(ValueError, match="could not read .*labels.npy"):                       # no labels
        load_latents(str(tmp_path / "z"))
    for latents, labels, message in [(np.zeros((6, 4, 2, 2), np.int64), np.arange(6), "has latents"),
                                     (np.zeros((6, 4, 2, 2), np.float16), np.arange(5), "has latents"),
                                     (np.zeros((6, 4, 2, 2), np.float16), np.arange(6) - 1, "must be >= 0")]:
        np.save(tmp_path / "z" / "latents.npy", latents)
        np.save(tmp_path / "z" / "labels.npy", labels)
        with pytest.raises(ValueError, match=message):
            load_latents(str(tmp_path / "z"))


def test_a_latents_file_far_larger_than_what_training_reads_stays_unread(tmp_path):
    """Resident memory grows by far less than the file: only the batches' rows are read, and they are read, not
    mapped (a memory test, not a timing)."""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs Linux's /proc to read resident memory")

    def write(name, n, shape=(4, 16, 16)):                            # 2 KB a row
        os.makedirs(tmp_path / name)
        rows = np.lib.format.open_memmap(tmp_path / name / "latents.npy", mode="w+", dtype=np.float16,
                                         shape=(n, *shape))
        rng = np.random.default_rng(0)
        for i in range(0, n, 10_000):
            rows[i:i + 10_000] = rng.standard_normal((min(10_000, n - i), *shape), dtype=np.float32)
        rows.flush()
        del rows                                                      # unmapped: its pages are not ours any more
        np.save(tmp_path / name / "labels.npy", np.arange(n) % 10)
        return tmp_path / name

    def resident():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

    def train(path, out):
        run(tmp_path, "--dataset", "latents", "--data-path", str(path), "--patch-size", "4", "--routing", "residual",
            "--steps", "30", "--batch-size", "64", "--vae", "none", out=out)          # 1,920 rows read
    train(write("small", 2_000), "warm")        # torch's first-use allocations (~200 MB alone) before the window
    big = write("big", 100_000)                                       # 205 MB, 2% of it read
    size = os.path.getsize(big / "latents.npy")
    before = resident()
    train(big, "big")
    assert resident() - before < size / 10, (resident() - before, size)   # (a memory map: + 60% with its neighbours)


def test_validation_subset_of_a_class_sorted_folder_is_random_not_the_first_class(tmp_path):
    from torchvision.utils import save_image
    for name in ["a", "b", "c"]:
        os.makedirs(tmp_path / "val" / name)
        for i in range(6):
            save_image(torch.rand(3, 8, 8), tmp_path / "val" / name / f"{i}.png")
    args = train_cifar.parse_args(["--dataset", "folder", "--data-dir", str(tmp_path / "val"), "--val-dir",
                                   str(tmp_path / "val"), "--val-size", "6", "--image-size", "8", "--device", "cpu"])
    data = train_cifar.load_data(args)
    assert len(data["val_y"]) == 6 and len(set(data["val_y"].tolist())) > 1      # the first 6 are all class 0
    assert torch.equal(train_cifar.load_data(args)["val_y"], data["val_y"])     # the same subset every time


def test_the_sample_script_writes_grid_and_npz(tmp_path):
    import subprocess
    import sys
    out = run(tmp_path, "--routing", "dar", "--steps", "2")
    ckpt = os.path.join(out, "dar", "ckpt.pt")
    done = subprocess.run([sys.executable, os.path.join(HERE, "tools", "sample.py"), ckpt, "--num-samples", "5",
                           "--sample-steps", "2", "--device", "cpu"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0 and "5 samples" in done.stdout, done.stderr
    images = np.load(os.path.join(out, "dar", "ckpt_samples5.npz"))["arr_0"]      # what ADM's evaluator reads
    assert images.shape == (5, 16, 16, 3) and images.dtype == np.uint8
    assert os.path.exists(os.path.join(out, "dar", "ckpt_samples5.png"))


def test_train_cifar_bad_input(tmp_path):
    with pytest.raises(ValueError, match="ImageFolder directory"):
        run(tmp_path, "--dataset", "folder", "--data-dir", str(tmp_path / "missing"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match="no images found"):
        run(tmp_path, "--dataset", "folder", "--data-dir", str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        run(tmp_path, "--patch-size", "3")
    with pytest.raises(SystemExit):
        run(tmp_path, "--preset", "XL")                                             # argparse names the choices
    with pytest.raises(ValueError, match="--routing"):
        run(tmp_path, "--routing", "highway")
    run(tmp_path, "--routing", "dar", "--steps", "2", out="cfg")
    with pytest.raises(ValueError, match="another model configuration"):
        run(tmp_path, "--routing", "dar", "--steps", "4", "--depth", "3", "--resume", out="cfg")
    with pytest.raises(ValueError, match="--dataset shapes"):                        # offline CIFAR-10
        train_cifar.main(["--dataset", "cifar10", "--data-root", str(tmp_path / "nocifar"), "--device", "cpu"])


# ---------------------------------------------------------------------------------- nothing lost, nothing silent

def test_keep_every_keeps_a_copy_of_those_checkpoints(tmp_path):
    out = run(tmp_path, "--routing", "residual", "--steps", "5", "--ckpt-every", "1", "--keep-every", "2")
    kept = sorted(f for f in os.listdir(os.path.join(out, "residual")) if f.startswith("ckpt_"))
    assert kept == ["ckpt_0000002.pt", "ckpt_0000004.pt"]
    assert torch.load(os.path.join(out, "residual", kept[0]), weights_only=True)["step"] == 2
    with pytest.raises(ValueError, match="multiple of --ckpt-every"):
        run(tmp_path, "--keep-every", "3", "--ckpt-every", "2", out="bad")


def test_a_rerun_never_replaces_a_run_silently(tmp_path):
    out = run(tmp_path, "--routing", "dar", "--steps", "2")
    log = open(os.path.join(out, "dar", "log.jsonl")).read()
    with pytest.raises(ValueError, match="already holds a run.*--resume.*--overwrite"):
        run(tmp_path, "--routing", "dar", "--steps", "3")
    assert open(os.path.join(out, "dar", "log.jsonl")).read() == log
    assert torch.load(os.path.join(out, "dar", "ckpt.pt"), weights_only=True)["step"] == 2
    with pytest.raises(ValueError, match="not both"):
        run(tmp_path, "--routing", "dar", "--resume", "--overwrite")
    run(tmp_path, "--routing", "dar", "--steps", "3", "--eval-every", "3", "--overwrite")
    assert sorted(f for f in os.listdir(os.path.join(out, "dar")) if f.endswith(".png")) == ["samples_0000003.png"]
    run(tmp_path, "--routing", "residual", "--steps", "2")            # another arm in the same --out is no conflict


def test_resume_needs_a_checkpoint_at_or_before_the_last_step(tmp_path):
    with pytest.raises(ValueError, match="no checkpoint .* to continue from"):
        run(tmp_path, "--routing", "dar", "--resume", out="typo")
    assert not os.path.exists(tmp_path / "typo" / "dar" / "log.jsonl")
    out = run(tmp_path, "--routing", "dar", "--steps", "4")
    with pytest.raises(ValueError, match="at step 4, beyond --steps 2"):
        run(tmp_path, "--routing", "dar", "--steps", "2", "--resume")
    log = open(os.path.join(out, "dar", "log.jsonl")).read()
    run(tmp_path, "--routing", "dar", "--steps", "4", "--resume")                   # finished: nothing to train
    assert open(os.path.join(out, "dar", "log.jsonl")).read() == log
    run(tmp_path, "--routing", "residual,dar", "--steps", "4", "--resume", "auto")  # residual starts, dar is done
    assert [r["step"] for r in read_log(os.path.join(out, "residual", "log.jsonl")) if r["kind"] == "done"] == [4]


@pytest.mark.parametrize("argv,message", [
    (["--class-dropout", "0"], "--class-dropout > 0, or --cfg-scale 1"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
    (["--depth", "0"], "--depth must be a positive integer"),
    (["--batch-size", "0"], "--batch-size must be a positive integer"),
    (["--val-size", "0"], "--val-size must be a positive integer"),
    (["--lr", "nan"], "--lr must be a finite positive number"),
    (["--ema-decay", "1"], r"--ema-decay must be in \[0, 1\)"),
    (["--hidden-size", "30", "--num-heads", "4"], "divisible by --num-heads"),
    (["--routing", "dar,dar"], "--routing must be"),
    (["--device", "tpu"], "--device must be auto, cpu, cuda"),
    (["--dataset", "shapes", "--vae", "none"], "--vae decodes latents: it needs --dataset latents"),
    (["--device", "cuda:99"], "no such CUDA GPU"),
    (["--batch-size", "8", "--micro-batch", "3"], "--micro-batch must divide --batch-size"),
])
def test_options_are_checked_before_any_data_is_loaded(tmp_path, monkeypatch, argv, message):
    monkeypatch.setattr(train_cifar, "load_data", lambda args: pytest.fail("data loaded before the options were checked"))
    with pytest.raises(ValueError, match=message):
        train_cifar.main(["--out", str(tmp_path / "run")] + argv)
    assert not os.path.exists(tmp_path / "run")


def test_data_is_checked_when_loaded(tmp_path):
    from torchvision.utils import save_image
    x, y = torch.randn(20, 4, 8, 8), torch.randint(0, 5, (20,))
    cases = {"nan.pt": ({"x": x.clone().index_fill_(0, torch.tensor([3]), float("nan")), "y": y}, "NaN or infinite"),
             "keys.pt": ({"latents": x, "labels": y}, "could not read x and y"),
             "float_y.pt": ({"x": x, "y": y.float()}, "integer labels"),
             "negative_y.pt": ({"x": x, "y": y - 10}, "labels y must be >= 0")}
    for name, (content, message) in cases.items():
        torch.save(content, tmp_path / name)
        with pytest.raises(ValueError, match=message):
            train_cifar.load_latents(str(tmp_path / name))
    (tmp_path / "text.pt").write_text("not a tensor file")
    with pytest.raises(ValueError, match="could not read x and y"):
        train_cifar.load_latents(str(tmp_path / "text.pt"))
    for root, classes in (("train", ["cat", "dog"]), ("val", ["cat", "cow", "dog"])):
        for name in classes:
            os.makedirs(tmp_path / root / name)
            for i in range(3):
                save_image(torch.rand(3, 8, 8), tmp_path / root / name / f"{i}.png")
    folder = ["--dataset", "folder", "--data-dir", str(tmp_path / "train"), "--image-size", "8", "--device", "cpu"]
    with pytest.raises(ValueError, match="same class folders"):
        train_cifar.load_data(train_cifar.parse_args(folder + ["--val-dir", str(tmp_path / "val")]))
    truncated = (tmp_path / "train" / "dog" / "0.png").read_bytes()[:60]
    for name, content in (("empty.png", b""), ("corrupt.png", truncated)):
        (tmp_path / "train" / "dog" / name).write_bytes(content)
        with pytest.raises(ValueError, match=f"cannot read image .*{name}"):
            train_cifar.load_data(train_cifar.parse_args(folder))
        os.remove(tmp_path / "train" / "dog" / name)


def test_checkpoints_load_safely_and_a_foreign_file_gets_one_line(tmp_path):
    out = run(tmp_path, "--routing", "dar", "--steps", "2")
    ckpt = os.path.join(out, "dar", "ckpt.pt")
    assert train_cifar.load_checkpoint(ckpt)["step"] == 2                 # our own checkpoints load as weights only
    data = open(ckpt, "rb").read()
    bad = {"truncated.pt": data[:len(data) // 2], "empty.pt": b""}
    for name, content in bad.items():
        (tmp_path / name).write_bytes(content)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "code.pt")    # a pickled module: refused, never run
    for name, message in [("truncated.pt", "not a readable checkpoint"), ("empty.pt", "not a readable checkpoint"),
                          ("other.pt", "not a checkpoint of train_cifar.py"), ("code.pt", "not a readable checkpoint")]:
        path = str(tmp_path / name)
        with pytest.raises(ValueError, match=message):
            tools.sample.main([path, "--device", "cpu"])
        with pytest.raises(ValueError, match=message):
            tools.diagnose.main([path, "--dataset", "shapes", "--device", "cpu", "--out", str(tmp_path / "d")])
    os.replace(tmp_path / "truncated.pt", ckpt)
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        run(tmp_path, "--routing", "dar", "--steps", "4", "--resume")


def test_user_mistakes_end_in_one_line_and_exit_code_1(tmp_path):
    import subprocess
    import sys
    (tmp_path / "file").write_text("")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_cifar.py")
    for argv, message in [(["--batch-size", "0"], "--batch-size"),
                          (["--out", str(tmp_path / "file" / "run"), "--dataset", "shapes"], "cannot write to --out")]:
        p = subprocess.run([sys.executable, script, "--device", "cpu"] + argv, capture_output=True, text=True)
        assert p.returncode == 1 and p.stderr.count("\n") == 1 and p.stderr.startswith("error: ") and message in p.stderr


def test_a_non_finite_loss_ends_in_one_line(tmp_path, monkeypatch, capsys):
    import runpy
    import sys
    monkeypatch.setattr(sys, "argv", ["train_cifar.py", "--dataset", "shapes", "--image-size", "16", "--depth", "1",
                                      "--hidden-size", "16", "--num-heads", "2", "--batch-size", "4", "--steps", "3",
                                      "--lr", "1e30", "--log-every", "1", "--device", "cpu", "--routing", "residual",
                                      "--out", str(tmp_path / "run")])
    with pytest.raises(SystemExit, match="^error: .*non-finite loss at step"):
        runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_cifar.py"), run_name="__main__")


# ================================================================================================ diagnostics

from dar_minimal import flow_statistics, gated_residual_forward, ridge_r2, routing_map, source_importance  # noqa: E402


@pytest.mark.parametrize("routing", ["residual", "dar"])
def test_flow_statistics_at_init_are_known_by_hand(routing):
    """adaLN-Zero: every sublayer output is 0, so z_k = h_0 (residual) or h_0 / |S_l| (DAR, uniform weights):
    RMS known, neighbouring states parallel (cos = 1), and the zero output layer passes no gradient back."""
    model = DiT(**TINY, routing=routing, dar_chunk=2).eval()
    x, _, y = inputs()
    h0 = model.x_embedder(x) + model.pos_embed
    s = flow_statistics(model, x, y, 1.0, torch.randn_like(x))
    rms0 = h0.pow(2).mean(-1).sqrt().mean().item()
    sizes = [1, 1, 1] if routing == "residual" else [len(chunk_sources(l, 6, 2)) for l in (3, 5, 7)]
    assert s["forward_rms"] == pytest.approx([rms0 / k for k in sizes], rel=1e-5)
    assert s["cosine"] == pytest.approx([1.0, 1.0], abs=1e-5)
    assert s["gradient_rms"] == [0.0, 0.0, 0.0]


def test_gated_residual_forward_is_exact_and_gate_gradients_are_dot_products():
    model = randomize(DiT(**TINY, routing="residual")).double().eval()
    x, t, y = inputs(dtype=torch.float64)
    gates = torch.ones(7, 7, dtype=torch.float64, requires_grad=True)
    out = gated_residual_forward(model, x, t, y, gates)
    assert torch.equal(out, model(x, t, y))                            # the forward stays exactly the same
    # dL/dgate_{i->l} = <v_i, dL/dh_l>: capture h_l and v_i through the sublayer inputs
    hs = []
    hooks = [b.norm1.register_forward_hook(lambda m, i, o: hs.append(i[0])) for b in model.blocks]
    hooks += [b.norm2.register_forward_hook(lambda m, i, o: hs.append(i[0])) for b in model.blocks]
    hooks.append(model.final_layer.norm_final.register_forward_hook(lambda m, i, o: hs.append(i[0])))
    out = gated_residual_forward(model, x, t, y, gates)
    for h in hooks:
        h.remove()
    loss = out.pow(2).sum()
    g_gates = torch.autograd.grad(loss, gates, retain_graph=True)[0]
    g_h = torch.autograd.grad(loss, hs)
    v = [hs[0]] + [hs[k] - hs[k - 1] for k in range(1, 7)]             # with gates = 1: v_i = h_{i+1} - h_i
    for l in (2, 5, 7):
        for i in range(l):
            assert torch.isclose(g_gates[l - 1, i], (v[i] * g_h[l - 1]).sum(), rtol=1e-8)


def test_source_importance_and_routing_map_shapes_and_sums():
    residual = randomize(DiT(**TINY, routing="residual")).eval()
    x, _, y = inputs()
    imp = source_importance(residual, x, y, [0.2, 0.8], torch.randn_like(x))
    assert imp.shape == (2, 7, 7) and torch.equal(imp, torch.tril(imp)) and imp.abs().sum() > 0
    dar = randomize(DiT(**TINY, dar_chunk=2)).eval()
    alpha = routing_map(dar, x, y, [0.2, 0.8], torch.randn_like(x))
    assert alpha.shape == (2, 7, 7) and torch.allclose(alpha.sum(-1), torch.ones(2, 7), atol=1e-5)
    assert alpha[0, 4, 1] == 0                                         # reader 5 (chunk 3) does not read v_1


def test_timestep_probe_recovers_linear_t_and_not_noise():
    g = torch.Generator().manual_seed(0)
    t = torch.rand(400, generator=g, dtype=torch.float64)
    noise = torch.randn(400, 16, generator=g, dtype=torch.float64)
    X = torch.cat([(3 * t - 1).unsqueeze(1) @ torch.randn(1, 16, generator=g, dtype=torch.float64) + 0.01 * noise], 1)
    assert ridge_r2(X[:200], t[:200], X[200:], t[200:]) > 0.98
    assert abs(ridge_r2(noise[:200], t[:200], noise[200:], t[200:])) < 0.15


def test_diagnose_script_writes_json_and_pictures(tmp_path):
    pytest.importorskip("matplotlib")
    for arm in ("residual", "dar"):
        run(tmp_path, "--routing", arm, "--steps", "2", out=arm)
    out = str(tmp_path / "diag")
    tools.diagnose.main([str(tmp_path / "residual" / "residual" / "ckpt.pt"), str(tmp_path / "dar" / "dar" / "ckpt.pt"),
                         "--dataset", "shapes", "--image-size", "16", "--val-size", "16", "--device", "cpu",
                         "--out", out])
    with open(os.path.join(out, "diagnostics.json")) as f:
        report = json.load(f)
    assert set(report) == {"residual", "dar"}
    assert len(report["dar"]["flow"]["1.0"]["forward_rms"]) == 2 and len(report["dar"]["probe"]["blocks"]) == 2
    names = os.listdir(out)
    assert {"routing_dar_reader2.png", "routing_dar_overview.png", "importance_residual_overview.png", "flow.png",
            "probe.png"} <= set(names)
    assert len(report["residual"]["importance"]) == len(report["dar"]["routing"]) == 10     # the same t grid


# ================================================================================================ sample quality (tools/classifier.py, tools/fid.py, tools/score.py)

@pytest.fixture(scope="module")
def shapes_classifier(tmp_path_factory):
    """A tiny classifier of the 16-pixel shapes (one epoch, width 4) and what tools/classifier.py reported."""
    import tools.classifier
    path = str(tmp_path_factory.mktemp("clf") / "shapes.pt")
    info = tools.classifier.main(["--dataset", "shapes", "--image-size", "16", "--epochs", "1", "--width", "4",
                                  "--batch-size", "128", "--out", path])
    return path, info


def test_the_classifier_script_writes_weights_its_accuracy_and_checksum(shapes_classifier):
    path, info = shapes_classifier
    assert info["heldout_accuracy"] > 0.3 and info["heldout_images"] == 1000     # chance: 0.1
    with open(path + ".json") as f:
        assert json.load(f)["sha256"] == fid.sha256(path) == info["sha256"]
    assert isinstance(fid.load_classifier(path), fid.Classifier)


def test_real_held_out_images_score_as_the_classifier_says_and_a_set_is_at_distance_zero_from_itself(shapes_classifier):
    path, info = shapes_classifier
    net = fid.load_classifier(path)
    x, y = make_shapes(1000, 16, 1)                                   # the held-out shapes of train_cifar (seed 0)
    real = x.float() / 127.5 - 1
    mu, cov = fid.feature_stats(fid.features(net, real, "cpu")[0])
    m = fid.measures(net, mu, cov, real, y, "cpu")
    assert abs(m["fid"]) < 1e-6                                       # the Frechet distance of a set with itself
    assert m["sample_accuracy"] == pytest.approx(info["heldout_accuracy"])   # real images: the test accuracy
    other = fid.measures(net, mu, cov, torch.rand(200, 3, 16, 16) * 2 - 1, y[:200], "cpu")
    assert other["fid"] > 1 and other["sample_accuracy"] < 0.5       # noise: far away, rarely its label


def test_classifier_backend_in_training_and_the_score_script_agree(shapes_classifier, tmp_path):
    path, _ = shapes_classifier
    out = run(tmp_path, "--routing", "dar", "--fid-every", "4", "--fid-backend", "classifier", "--fid-weights", path,
              "--fid-samples", "30")
    last = [r for r in read_log(os.path.join(out, "dar", "log.jsonl")) if r["kind"] == "eval"][-1]
    assert last["fid"] > 0 and 0 <= last["sample_accuracy"] <= 1
    import tools.score
    res = tools.score.main([os.path.join(out, "dar", "ckpt.pt"), "--draws", "2", "--dataset", "shapes",
                            "--image-size", "16", "--sample-steps", "2", "--device", "cpu", "--fid-backend",
                            "classifier", "--fid-weights", path, "--fid-samples", "30", "--out", str(tmp_path / "s.json")])
    first, second = res["rows"]
    assert first["fid"] == pytest.approx(last["fid"]) and first["sample_accuracy"] == last["sample_accuracy"]
    assert second["fid"] != first["fid"]                              # another draw of noise
    assert os.path.exists(tmp_path / "s.json")


def test_classifier_backend_without_its_weights_is_one_line(tmp_path):
    with pytest.raises(ValueError, match="needs --fid-weights FILE"):
        run(tmp_path, "--fid-every", "2", "--fid-backend", "classifier")
    (tmp_path / "bogus.pt").write_bytes(b"not a classifier")
    with pytest.raises(ValueError, match="not a classifier"):
        fid.load_classifier(str(tmp_path / "bogus.pt"))


# ================================================================================================ the GPU command paths, proven on the CPU (issue 38)

TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")


def torchrun(argv, script=SCRIPT, timeout=300):
    """A 2-process gloo torchrun of script with argv (one thread each); the finished process."""
    import subprocess
    import sys
    return subprocess.run([sys.executable, *TORCHRUN, script] + argv, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_under_torchrun_rank_0_downloads_first_and_the_others_read_what_it_wrote(tmp_path):
    """CIFAR-10's download: rank 0 alone fetches into --data-root, the others load it after a barrier."""
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(f"""
import os, sys, time
sys.path.insert(0, {HERE!r})
import train_cifar
from tools.data import SHAPE_NAMES, make_shapes

def download(root):      # as torchvision would: rank 0 takes a while to write the archive, the others must find it
    if os.environ["RANK"] == "0":
        time.sleep(2)
        open(os.path.join(root, "archive"), "w").close()
    elif not os.path.exists(os.path.join(root, "archive")):
        sys.exit("rank 1 loaded before rank 0 had written")
    x, y = make_shapes(64, 16, 0)
    return x, y, x[:16], y[:16], SHAPE_NAMES

train_cifar.load_cifar10 = download
train_cifar.main()
""")
    argv = MICRO[2:] + [
        "--dataset", "cifar10", "--data-root", str(tmp_path), "--steps", "1", "--routing", "residual",
        "--out", str(tmp_path / "run")]
    p = torchrun(argv, script=str(wrapper))
    assert p.returncode == 0, p.stderr[-2000:]


def test_the_log_is_rewritten_atomically_and_read_by_rank_0_alone(tmp_path, monkeypatch):
    path = tmp_path / "log.jsonl"
    log = train_cifar.Log(str(path))
    for step in (1, 2, 3):
        log.write(kind="train", step=step, loss=0.5)
    before = path.read_text()
    with open(path, "a") as f:
        f.write('{"kind": "tra')                                         # rank 0 in the middle of a line
    assert train_cifar.Log(str(path), keep_until=2, write=False).records == []     # another process: not read
    path.write_text(before)
    calls = []

    def dies_in_the_middle(record):                              # a kill while the resumed log is written
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return json.dumps(record)
    monkeypatch.setattr(train_cifar.json, "dumps", dies_in_the_middle)
    with pytest.raises(KeyboardInterrupt):
        train_cifar.Log(str(path), keep_until=2)
    assert path.read_text() == before                                    # the whole log, as it was
    monkeypatch.undo()
    assert [r["step"] for r in train_cifar.Log(str(path), keep_until=2).records] == [1, 2]
    assert [r["step"] for r in read_log(path)] == [1, 2]


def test_fid_samples_cover_every_class_equally_in_any_number_of_processes_and_grids_name_their_classes(monkeypatch):
    """1,000 classes, 2,000 samples in chunks of 500: every class drawn twice, whether 1 or 2 processes share them
    (the chunks of a process: its own noise seeds and labels), and a grid shows 10 classes spread over all."""
    model = DiT(input_size=4, patch_size=2, in_channels=3, hidden_size=8, depth=1, num_heads=2, num_classes=1000).eval()
    net = fid.Classifier(num_classes=1000, width=2).eval()
    drawn = {}

    def generate(model, n, args, seed=0, labels=None):
        drawn[(args.rank, seed)] = labels.clone()
        return torch.zeros(n, 3, 4, 4)

    def moments(net, batches, device):                        # draws every batch; the sums do not matter here
        for _ in batches:
            pass
        return dict(n=torch.tensor(2.), sum=torch.zeros(8), outer=torch.eye(8), correct=torch.tensor(0.))
    monkeypatch.setattr(train_cifar, "generate", generate)
    monkeypatch.setattr(fid, "moments", moments)
    args = train_cifar.parse_args(["--device", "cpu", "--fid-samples", "2000"])
    for args.rank, args.world in ((0, 1), (0, 2), (1, 2)):
        train_cifar.sample_quality(model, (net, torch.zeros(8), torch.eye(8)), args, decode=lambda x: x)
    one = torch.cat([drawn[(0, s)] for s in (1, 501, 1001, 1501)])
    assert torch.bincount(one, minlength=1000).tolist() == [2] * 1000
    assert sorted(drawn) == [(0, 1), (0, 501), (0, 1001), (0, 1501), (1, 501), (1, 1501)]   # rank 1: chunks 1, 3
    assert train_cifar.grid_classes(1000).tolist() == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert train_cifar.grid_classes(10).tolist() == list(range(10))


def test_a_20000_sample_score_streams_its_samples_instead_of_holding_them(tmp_path):
    """20,000 samples decoded to 3 x 64 x 64 would hold 983 MB as float32 (twice while concatenated); streamed in
    chunks the process grows by a few tens of MB."""
    import subprocess
    import sys
    script = tmp_path / "score20k.py"
    script.write_text(f"""
import json, resource, sys, torch
sys.path.insert(0, {HERE!r})
import train_cifar
from dar_minimal import DiT
from tools import fid
torch.manual_seed(0)
args = train_cifar.parse_args(["--device", "cpu", "--fid-samples", "20000", "--sample-steps", "1", "--cfg-scale", "1"])
model = DiT(input_size=4, patch_size=2, in_channels=4, hidden_size=16, depth=1, num_heads=2, num_classes=10).eval()
net = fid.Classifier(num_classes=10, width=2).eval()
decode = lambda z: torch.nn.functional.interpolate(z[:, :3], size=64).tanh()     # 'decoded' to 3 x 64 x 64
args.fid_samples = 500
train_cifar.sample_quality(model, (net, torch.zeros(8, dtype=torch.float64), torch.eye(8, dtype=torch.float64)), args, decode)     # one chunk: warmed up
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
args.fid_samples = 20000
m = train_cifar.sample_quality(model, (net, torch.zeros(8, dtype=torch.float64), torch.eye(8, dtype=torch.float64)), args, decode)
print(json.dumps(dict(grew_mb=(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024, **m)))
""")
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-2000:]
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result["grew_mb"] < 100 and math.isfinite(result["fid"]), result


def test_a_training_forward_on_a_device_never_waits_for_a_label_check():
    """On a GPU the check of the labels' range would sync the host at every step; training checks them once when
    the data is loaded (meta tensors stand in for a device: reading their values fails, as a sync would)."""
    model = DiT(**TINY, num_classes=10).to("meta")
    x, t, y = torch.zeros(2, 3, 8, 8, device="meta"), torch.zeros(2, device="meta"), torch.zeros(2, dtype=torch.long,
                                                                                                 device="meta")
    assert model.train()(x, t, y).shape == (2, 3, 8, 8)
    with pytest.raises(Exception):
        model.eval()(x, t, y)                                      # sampling and evaluation still check

def test_labels_beyond_the_data_sets_classes_are_refused_when_loaded(tmp_path):
    np.save(tmp_path / "latents.npy", np.zeros((20, 4, 8, 8), np.float16))
    np.save(tmp_path / "labels.npy", np.array([0, 1] * 9 + [2, 0]))
    (tmp_path / "latents.json").write_text(json.dumps(dict(classes=["cat", "dog"], count=20, done=20)))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\) for the 2 classes of the data set, found 2"):
        train_cifar.load_data(train_cifar.parse_args(["--dataset", "latents", "--data-path", str(tmp_path),
                                                      "--val-size", "4", "--device", "cpu"]))


def test_a_resumed_run_frees_its_checkpoint_and_takes_the_optimiser_as_configured_here(tmp_path, monkeypatch):
    """The loaded checkpoint is not kept while training (no second copy of the weights), and an unfused optimiser's
    checkpoint resumes into a fused AdamW (as on CUDA) as the same run."""
    import gc
    import weakref
    straight = run(tmp_path, "--routing", "dar", "--steps", "4", out="straight")
    run(tmp_path, "--routing", "dar", "--steps", "2", out="resumed")
    loaded, fused = [], []
    load = train_cifar.load_checkpoint

    def load_and_watch(*a, **k):
        ckpt = load(*a, **k)
        loaded.extend(weakref.ref(v) for w in ("model", "ema") for v in ckpt[w].values())
        return ckpt

    def check_then_train(*a, **k):
        gc.collect()
        assert loaded and all(r() is None for r in loaded), "the checkpoint's weights are still held"
        return flow_matching_loss(*a, **k)
    adamw = torch.optim.AdamW
    monkeypatch.setattr(train_cifar, "load_checkpoint", load_and_watch)
    monkeypatch.setattr(train_cifar, "flow_matching_loss", check_then_train)
    monkeypatch.setattr(torch.optim, "AdamW", lambda *a, **k: fused.append(adamw(*a, **dict(k, fused=True))) or fused[-1])
    out = run(tmp_path, "--routing", "dar", "--steps", "4", "--resume", out="resumed")
    assert all(g["fused"] for g in fused[-1].param_groups)
    logs = [[r["loss"] for r in read_log(os.path.join(o, "dar", "log.jsonl")) if r["kind"] == "train"]
            for o in (straight, out)]
    assert logs[1] == pytest.approx(logs[0], rel=1e-5)


def test_micro_batches_train_as_the_whole_batch_and_out_of_memory_names_the_option(tmp_path, monkeypatch):
    """--micro-batch 2 of 8: four passes, gradients added, one update; each pass takes its part of the step's draws
    (t, noise, label drops) as processes do, so the run equals the one without, to the torchrun test's tolerance."""
    drops = {}

    def record(*a, drop=None, **k):
        if drop is not None:                                     # (training steps, not validation)
            drops.setdefault(k["x0"].shape[0], []).append(drop)
        return flow_matching_loss(*a, drop=drop, **k)
    monkeypatch.setattr(train_cifar, "flow_matching_loss", record)
    argv = ["--routing", "dar", "--steps", "3", "--eval-every", "3", "--class-dropout", "0.5"]
    whole, micro = run(tmp_path, *argv, out="whole"), run(tmp_path, *argv, "--micro-batch", "2", out="micro")
    assert torch.equal(torch.cat(drops[8]), torch.cat(drops[2])) and torch.cat(drops[8]).any()
    logs = [read_log(os.path.join(o, "dar", "log.jsonl")) for o in (whole, micro)]
    losses = [[r.get("loss", r.get("val_loss")) for r in log if r["kind"] != "done"] for log in logs]
    assert len(losses[0]) == 4 and losses[1] == pytest.approx(losses[0], rel=1e-5)
    a, b = (torch.load(os.path.join(o, "dar", "ckpt.pt"), weights_only=True) for o in (whole, micro))
    assert all(torch.allclose(a["model"][k], b["model"][k], atol=1e-5) for k in a["model"])

    def out_of_memory(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    monkeypatch.setattr(train_cifar, "flow_matching_loss", out_of_memory)
    with pytest.raises(ValueError, match=r"out of memory in a training step of 4 samples per process \(--batch-size 8 "
                                         r"over 1 process\(es\)\): give --micro-batch 2 or less"):
        run(tmp_path, "--routing", "dar", "--micro-batch", "4", out="oom")


def test_latents_are_mirrored_only_where_the_mirror_images_latents_are_stored(encoded, tmp_path):
    """Latents are not mirror-equivariant: no mirroring by default; --mirror stores the mirror images' latents and
    training takes them where the step's flips say."""
    from PIL import Image
    _, vae_dir, argv, plain_dir = encoded
    mirror_dir = encode_latents.main([argv[0], str(tmp_path / "zm")] + argv[2:] + ["--mirror"])
    zm = np.load(os.path.join(mirror_dir, "latents_mirrored.npy"))
    assert np.array_equal(np.load(os.path.join(mirror_dir, "latents.npy")), np.load(os.path.join(plain_dir,
                                                                                                  "latents.npy")))
    vae = encode_latents.load_autoencoder(vae_dir, "cpu")
    image = encode_latents.center_crop(Image.open(os.path.join(argv[0], "dog", "0.png")), 16)
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        expected = vae.encode(x.flip(-1)).latent_dist.mean[0] * 0.18215       # the mirror image's latent
    assert torch.allclose(torch.from_numpy(zm[20]).float(), expected, rtol=1e-3, atol=1e-4)
    for z_dir, mirrored in ((plain_dir, False), (mirror_dir, True)):
        args = train_cifar.parse_args(["--dataset", "latents", "--data-path", z_dir, "--patch-size", "2",
                                       "--batch-size", "8", "--device", "cpu"])
        data = train_cifar.load_data(args)
        x1, _ = train_cifar.batches(data, args)(5)
        rows = data["train_x"]
        idx = train_cifar.epoch_order(len(rows), 0, 5 // (len(rows) // 8))[(5 % (len(rows) // 8)) * 8:][:8]
        flip = train_cifar.step_flips(8, 5, args)[0]
        assert flip.any() and not flip.all()
        expected = torch.where(flip[:, None, None, None], torch.from_numpy(zm[rows.index[idx]]).float(), rows[idx]) \
            if mirrored else rows[idx]                                   # never flipped as if they were images
        assert torch.equal(x1, expected)


def test_an_autoencoder_without_a_shift_factor_is_read_as_unshifted():
    from diffusers.configuration_utils import FrozenDict
    vae = type("VAE", (), {})()
    vae.config = FrozenDict(scaling_factor=0.18215)                     # an older diffusers config: no shift_factor
    assert encode_latents.scaling(vae) == (0.18215, 0.0)
    vae.config = FrozenDict(scaling_factor=0.3611, shift_factor=0.1159)
    assert encode_latents.scaling(vae) == (0.3611, 0.1159)


def test_rows_are_read_a_step_ahead_in_a_background_thread():
    import threading
    from tools.data import Prefetch
    where = {}

    def read(step):
        where[step] = threading.current_thread()
        return step * 10
    ahead = Prefetch(read)
    assert [ahead(0), ahead(1), ahead(2), ahead(7)] == [0, 10, 20, 70]
    ahead.close()
    assert where[0] is threading.main_thread() and where[1] is not threading.main_thread()   # 1 read during step 0
    assert where[7] is threading.main_thread()                                          # a jump: read at once


def test_gpu_check_script_says_how_to_call_it():
    import subprocess
    p = subprocess.run(["bash", os.path.join(HERE, "results", "gpu", "run.sh")], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.strip() == ("usage: bash results/gpu/run.sh paths|bench|train (got ''); "
                                                      "settings in the header of this script")


def test_cpu_rehearsal_of_the_gpu_paths_torchrun_latents_mirror_micro_batch_fid_sigterm_resume(encoded, tmp_path):
    """Under torchrun (2 gloo processes): latents of tools/encode_latents.py --mirror, --micro-batch, FID with the
    classifier backend (each process its share of 600 samples) and grids decoded by the tiny autoencoder; stopped by
    SIGTERM and resumed, it ends with the weights and log of an unstopped 1-process run."""
    import signal
    _, vae_dir, argv, _ = encoded
    z_dir = encode_latents.main([argv[0], str(tmp_path / "zm")] + argv[2:] + ["--mirror"])
    clf = fid.Classifier(num_classes=2, width=4)
    torch.save(dict(config=clf.config, model=clf.state_dict()), tmp_path / "clf.pt")
    common = MICRO[4:10] + MICRO[12:] + [                             # MICRO on latents, in 2 x 2 patches
        "--dataset", "latents", "--data-path", z_dir, "--patch-size", "2", "--micro-batch", "2", "--eval-every", "2",
        "--fid-every", "2", "--fid-backend", "classifier", "--fid-weights", str(tmp_path / "clf.pt"),
        "--fid-samples", "600"]
    rc, stderr, path, ckpt = signalled_run(tmp_path, signal.SIGTERM, launcher=TORCHRUN, routing="dar",
                                           argv=common + ["--steps", "100000"])
    assert rc != 0 and f"stopped at step {ckpt['step']}" in stderr, stderr[-3000:]
    end = ckpt["step"] + 4 - ckpt["step"] % 2                            # an even step: evaluated in both runs
    p = torchrun(common + ["--routing", "dar", "--steps", str(end), "--resume", "--out", str(tmp_path / "run")])
    assert p.returncode == 0, p.stderr[-3000:]
    train_cifar.main(common + ["--routing", "dar", "--steps", str(end), "--out", str(tmp_path / "one")])
    logs = [read_log(tmp_path / o / "dar" / "log.jsonl") for o in ("run", "one")]
    numbers = [[(r["step"], r.get("loss"), r.get("val_loss"), r.get("fid"), r.get("sample_accuracy"))
                for r in log if r["kind"] != "done"] for log in logs]
    assert [n[:1] for n in numbers[0]] == [n[:1] for n in numbers[1]] and len(numbers[0]) >= end + 2
    flat = [[v for row in n for v in row[1:] if v is not None] for n in numbers]
    assert flat[0] == pytest.approx(flat[1], rel=1e-4)
    assert sum("fid" in r for r in logs[0]) == end // 2
    a, b = (torch.load(tmp_path / o / "dar" / "ckpt.pt", weights_only=True) for o in ("run", "one"))
    assert all(torch.allclose(a[w][k], b[w][k], atol=1e-5) for w in ("model", "ema") for k in a["model"])
    assert os.path.exists(tmp_path / "run" / "dar" / f"samples_{end:07d}.png")      # decoded by the autoencoder


# ================================================================================================ the teaching notebook (run_dar.ipynb)

def test_the_notebook_runs_top_to_bottom_with_its_fast_settings(tmp_path, monkeypatch):
    """Every cell of run_dar.ipynb in order, as a class would run it, with a few training steps (DAR_NOTEBOOK=fast):
    no cell errors, and the two arms are trained where the notebook says."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    monkeypatch.setenv("DAR_NOTEBOOK", "fast")
    monkeypatch.setenv("DAR_NOTEBOOK_OUT", str(tmp_path / "run"))
    nb = nbformat.read(os.path.join(HERE, "run_dar.ipynb"), as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": HERE}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "reader 2: weights [0.5, 0.5]" in outputs and "final val loss" in outputs
    assert os.path.exists(tmp_path / "run" / "dar" / "ckpt.pt")
