import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lnfm.train import optim


def test_peak_lr_scales_with_global_batch():
    assert optim.peak_lr(optim.OptimConfig(base_lr=1.5e-4), 512) == pytest.approx(3e-4)
    assert optim.peak_lr(optim.OptimConfig(base_lr=1.5e-4, lr=1e-3), 512) == 1e-3


def test_warmup_cosine_matches_hand_formula():
    cfg = optim.OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    sched = optim.make_schedule(cfg, 110, 256)
    assert float(sched(0)) == 0.0
    assert float(sched(5)) == pytest.approx(0.5)
    assert float(sched(10)) == pytest.approx(1.0)
    for s in (35, 60, 109):
        t = (s - 10) / 100
        assert float(sched(s)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)), rel=1e-5)


def test_constant_schedule_and_warmup_capped_to_run_length():
    sched = optim.make_schedule(optim.OptimConfig(lr=2.0, warmup_steps=1000, schedule="constant"), 5, 256)
    assert float(sched(2)) == pytest.approx(1.0)  # warmup shrinks to 4 steps
    assert float(sched(4)) == pytest.approx(2.0)


PARAMS = {"blocks": {"0": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones((3,))}},
          "pos_embed": jnp.ones((5, 4)), "head": {"kernel": jnp.ones((3, 2))}}


def test_decay_mask_skips_vectors_and_named_leaves():
    mask = optim.decay_mask(PARAMS, ("pos_embed",))
    assert mask == {"blocks": {"0": {"kernel": True, "bias": False}}, "pos_embed": False, "head": {"kernel": True}}


def test_adamw_matches_optax_reference():
    cfg = optim.OptimConfig(lr=1e-2, warmup_steps=3, weight_decay=0.05, clip_norm=0.5, no_decay=("pos_embed",))
    tx, sched = optim.make_optimizer(cfg, PARAMS, 20, 256)
    ref = optax.chain(optax.clip_by_global_norm(0.5),
                      optax.adamw(sched, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.05,
                                  mask=optim.decay_mask(PARAMS, ("pos_embed",))))
    def run(opt):
        def step(carry, g):
            p, s = carry
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        return jax.jit(lambda p: jax.lax.scan(step, (p, opt.init(p)), grads)[0][0])(PARAMS)

    rng = np.random.default_rng(0)
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=(5, *x.shape)), jnp.float32), PARAMS)
    p1, p2 = run(tx), run(ref)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_layer_lr_scales_multiply_updates():
    def layer_of(path):
        return 1 if path.startswith("blocks") else (0 if path == "pos_embed" else 2)

    scales = optim.layer_lr_scales(PARAMS, layer_of, 2, 0.5)
    assert scales["blocks"]["0"]["kernel"] == 0.5 and scales["pos_embed"] == 0.25 and scales["head"]["kernel"] == 1.0
    cfg = optim.OptimConfig(lr=1e-2, warmup_steps=0, weight_decay=0.0, clip_norm=0.0, schedule="constant")
    plain, _ = optim.make_optimizer(cfg, PARAMS, 10, 256)
    scaled, _ = optim.make_optimizer(cfg, PARAMS, 10, 256, lr_scales=scales)
    g = jax.tree.map(lambda x: jnp.full(x.shape, 0.3), PARAMS)
    u_plain, _ = plain.update(g, plain.init(PARAMS), PARAMS)
    u_scaled, _ = scaled.update(g, scaled.init(PARAMS), PARAMS)
    np.testing.assert_allclose(u_scaled["pos_embed"], 0.25 * u_plain["pos_embed"], rtol=1e-6)
    np.testing.assert_allclose(u_scaled["blocks"]["0"]["bias"], 0.5 * u_plain["blocks"]["0"]["bias"], rtol=1e-6)


def test_global_norm():
    tree = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([[4.0]])}
    assert float(optim.global_norm(tree)) == pytest.approx(5.0)


def _decayed_names(model) -> dict[str, bool]:
    from flax import nnx

    from lnfm.train.state import path_str

    params = nnx.state(model, nnx.Param)
    mask = optim.decay_mask(params, optim.OptimConfig().no_decay)
    return {path_str(p): bool(v) for p, v in jax.tree_util.tree_leaves_with_path(mask)}


def test_default_decay_mask_spares_the_real_models_tables_and_tokens():
    """The names come from the models themselves: a learnable ViT position table, the class
    and mask tokens of MAE, and Swin's relative position bias tables get no decay."""
    from flax import nnx

    from lnfm.models import ModelConfig
    from lnfm.models.mae import MAE
    from lnfm.models.simmim import SimMIM

    mae = MAE(ModelConfig(img_size=(16, 16, 16), patch_size=(8, 8, 8), depth=1, cls_token=True,
                          pos_embed="learnable"), nnx.Rngs(0))
    swin = SimMIM(ModelConfig(arch="swin", size="tiny", img_size=(32, 32, 32), window_size=(2, 2, 2)),
                  nnx.Rngs(0))
    for model, spared in ((mae, {"pos_table", "cls_token", "mask_token"}),
                          (swin, {"relative_position_bias_table", "mask_token"})):
        names = _decayed_names(model)
        hits = {n: d for n, d in names.items() if spared.intersection(n.split("/"))}
        assert {part for n in hits for part in n.split("/")} >= spared  # every spared name exists in the model
        assert not any(hits.values()), hits
        matrices = [n for n, d in names.items() if n.endswith("kernel/value") and "/blocks/" in f"/{n}"]
        assert matrices and all(names[n] for n in matrices)  # transformer weights still decay


def test_params_ema_follows_the_hand_recursion_and_leaves_the_updates_alone():
    """The EMA after each update against a numpy recursion with the ramped decay
    d_n = min(decay, (1 + n) / (10 + n)); the parameters themselves move exactly as without it."""
    base = optim.OptimConfig(lr=1e-2, warmup_steps=0, weight_decay=0.05, clip_norm=1.0)
    plain, _ = optim.make_optimizer(base, PARAMS, 30, 256)
    with_ema, _ = optim.make_optimizer(optim.OptimConfig(**{**base.__dict__, "ema_decay": 0.9}), PARAMS, 30, 256)
    rng = np.random.default_rng(1)
    p_plain, s_plain = PARAMS, plain.init(PARAMS)
    p_ema, s_ema = PARAMS, with_ema.init(PARAMS)
    assert optim.ema_params(s_plain) is None
    expect = jax.tree.map(np.asarray, PARAMS)
    for n in range(25):
        g = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), PARAMS)
        u, s_plain = jax.jit(plain.update)(g, s_plain, p_plain)
        p_plain = optax.apply_updates(p_plain, u)
        u, s_ema = jax.jit(with_ema.update)(g, s_ema, p_ema)
        p_ema = optax.apply_updates(p_ema, u)
        d = min(0.9, (1 + n) / (10 + n))
        expect = jax.tree.map(lambda e, p: d * e + (1 - d) * np.asarray(p, np.float64), expect, p_ema)
    for a, b in zip(jax.tree.leaves(p_plain), jax.tree.leaves(p_ema)):
        np.testing.assert_array_equal(a, b)
    got = optim.ema_params(s_ema)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expect)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not np.allclose(got["head"]["kernel"], p_ema["head"]["kernel"])  # an average, not the last weights


@pytest.mark.parametrize("decay", [1.0, -0.1, float("nan")])
def test_params_ema_refuses_a_decay_outside_0_1(decay):
    with pytest.raises(optim.ConfigError, match="ema_decay"):
        optim.make_optimizer(optim.OptimConfig(lr=1e-3, ema_decay=decay), PARAMS, 10, 2)
