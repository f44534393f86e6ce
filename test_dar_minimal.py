"""Tiny CPU tests that prove the maths of dar_minimal.py (and, below, the plumbing of train_cifar.py)."""
import math

import pytest
import torch

from dar_minimal import DiT, chunk_sources, flow_matching_loss, guided, residual_to_dar, sample

TINY = dict(input_size=8, patch_size=2, hidden_size=32, depth=3, num_heads=4)
QUERIES = ["static", "static_t", "dynamic"]


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
    for alpha in model.routing_weights():
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
    alphas = model.routing_weights()
    assert len(alphas) == 7
    for l, alpha in enumerate(alphas, start=1):
        assert alpha.shape == (4, 16, len(chunk_sources(l, 6, chunk)))
        assert (alpha >= 0).all()
        assert torch.allclose(alpha.sum(-1), torch.ones(4, 16), atol=1e-6)


# ---------------------------------------------------------------------------------------------- equivalence

@pytest.mark.parametrize("query", QUERIES)
def test_zero_query_dense_dar_equals_residual(query):
    """Uniform weights give h_l = (residual stream) / l, and every consumer starts with a LayerNorm."""
    residual = randomize(DiT(**TINY, routing="residual")).double()
    dar = residual_to_dar(residual, dar_query=query, dar_chunk=1).double()
    x, t, y = inputs(dtype=torch.float64)
    a, b = residual(x, t, y), dar(x, t, y)
    assert a.norm() > 1
    assert (a - b).norm() / a.norm() < 1e-4


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
    return model.routing_weights()


def router_alpha(model, v, t):
    """The weights every reader of `model` gives fixed sources v at time t (keys fixed, only q(t) may move)."""
    router = model.router
    q = router.static_queries(model.t_embedder(t))
    s = [router.key_scores(v_i, q) for v_i in v]
    router.record_alpha, router.alpha = True, []
    for l in range(1, len(v) + 1):
        router(l, v, s, q)
    return router.alpha


@pytest.mark.parametrize("query,depends_on_t", [("static", False), ("static_t", True)])
def test_static_weights_ignore_t_and_static_t_weights_follow_t(query, depends_on_t):
    model = randomize(DiT(**TINY, dar_query=query, dar_chunk=1))
    v = [torch.randn(2, 16, 32) for _ in range(7)]                    # fixed sources v_0 .. v_6
    a0, a1 = router_alpha(model, v, torch.zeros(2)), router_alpha(model, v, torch.ones(2))
    if depends_on_t:
        assert max((p - q).abs().max() for p, q in zip(a0, a1)) > 1e-2
    else:
        assert all(torch.equal(p, q) for p, q in zip(a0, a1))


def test_static_t_starts_as_static():
    model = DiT(**TINY, dar_query="static_t")
    with torch.no_grad():
        model.router.w.normal_()
    q0 = model.router.static_queries(model.t_embedder(torch.zeros(2)))
    q1 = model.router.static_queries(model.t_embedder(torch.ones(2)))
    assert torch.equal(q0, q1)                                        # e(t) = 0 at init


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


def test_routing_weights_read_out_are_those_of_the_forward():
    """Rebuild the final aggregator's input from the read-out weights and check the model's output."""
    model = randomize(DiT(**TINY, dar_query="static_t", dar_chunk=2)).double()
    x, t, y = inputs(dtype=torch.float64)
    sources = []
    model.router.record_alpha = True
    original = model.router.forward

    def spy(l, v, s, q):
        sources[:] = v
        return original(l, v, s, q)
    model.router.forward = spy
    out = model(x, t, y)
    alpha = model.routing_weights()[-1]
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
    flow_matching_loss(model, x, torch.tensor([0, 1, 2, 10]))         # the null class itself is a valid label
