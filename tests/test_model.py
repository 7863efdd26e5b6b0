"""The unified ranker: shapes, masking, padding, the missing vector, variants, checkpoints,
and the cold-start point of PPM on a toy task (modal vectors generalise to unseen ids)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.features import IMPRESSION_CODE, N_ACTIONS
from trainer.model import (
    CHECKPOINT_FORMAT,
    VARIANTS,
    RankerConfig,
    UnifiedRanker,
    load_checkpoint,
    save_checkpoint,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny tensors: a second thread only adds synchronisation, and on a busy 2-core machine
    # spinning OpenMP threads make these tests many times slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(variant: str = "ppm", **overrides) -> RankerConfig:
    """A config small enough for fast tests, with every part present."""
    return RankerConfig(**{
        "variant": variant, "item_buckets": 1024, "category_buckets": 16, "brand_buckets": 16,
        "shop_buckets": 16, "user_buckets": 32, "price_buckets": 4, "gap_buckets": 8,
        "max_seq_len": 12,
        "modal_dim": 24, "d_model": 32, "n_heads": 2, "n_layers": 1, "d_ff": 64,
        "side_dim": 4, "n_experts": 2, "expert_dim": 32, "tower_dim": 16, **overrides})


def make_model(variant: str = "ppm", seed: int = 0, **overrides) -> UnifiedRanker:
    torch.manual_seed(seed)
    return UnifiedRanker(tiny(variant, **overrides))


def random_batch(c: RankerConfig, B: int = 5, L: int = 6, M: int = 9, seed: int = 0,
                 labels: bool = True) -> dict[str, torch.Tensor]:
    """A batch in the contract: left-padded sequences of random lengths (one row empty)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, L + 1, (B, 1), generator=g)
    lengths[0] = 0  # a user with no history
    mask = torch.arange(L).unsqueeze(0) >= L - lengths  # (B, L)

    def ints(lo, hi, shape):
        return torch.randint(lo, hi, shape, generator=g)

    batch = {
        "item_id": ints(1, c.item_buckets, (B,)),
        "category": ints(0, c.category_buckets, (B,)),
        "brand": ints(0, c.brand_buckets, (B,)),
        "shop": ints(0, c.shop_buckets, (B,)),
        "price_bucket": ints(0, c.price_buckets, (B,)),
        "user_id": ints(0, max(c.user_buckets, 2), (B,)),
        "item_rates": torch.randn(B, 2, generator=g),
        "taste_rates": torch.randn(B, 4, generator=g),
        "user_rates": torch.randn(B, 2, generator=g),
        "seq_item_id": ints(1, c.item_buckets, (B, L)) * mask,
        "seq_action": ints(1, N_ACTIONS + (c.sequence_impressions > 0), (B, L)) * mask,
        "seq_gap": ints(1, c.gap_buckets, (B, L)) * mask,
        "seq_mask": mask,
        "modal_table": torch.randn(M, c.modal_dim, generator=g),
        "target_modal_row": ints(0, M, (B,)),
        "seq_modal_row": ints(0, M, (B, L)) * mask,
    }
    if labels:
        batch["labels"] = ints(0, 2, (B, len(c.tasks))).float()
        batch["label_mask"] = torch.ones(B, len(c.tasks), dtype=torch.bool)
    return batch


def scores(model: UnifiedRanker, batch: dict) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(batch)[0]


# -----------------------------------------------------------------------------
# Shapes, config


@pytest.mark.parametrize("variant", VARIANTS)
def test_shapes_and_loss(variant):
    model = make_model(variant)
    batch = random_batch(model.config)
    logits, loss = model(batch)
    assert logits.shape == (5, 3)
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    _, no_loss = model(random_batch(model.config, labels=False))
    assert no_loss is None


def test_default_config_runs_and_variants_have_only_their_modules():
    torch.manual_seed(0)
    default = UnifiedRanker(RankerConfig())
    assert default.config.variant == "ppm" and default.config.modal_dim == 1664
    logits, loss = default(random_batch(default.config, B=2, L=50, M=3))
    assert logits.shape == (2, 3) and torch.isfinite(loss)
    assert make_model("idrec").ppm is None
    assert make_model("modal").id_module is None
    ppm = make_model("ppm")
    assert ppm.id_module is not None and ppm.ppm is not None
    assert ppm.parameter_count() == sum(p.numel() for p in ppm.parameters())


@pytest.mark.parametrize("bad", [{"variant": "bert"}, {"task_weights": (1.0,)},
                                 {"d_model": 30, "n_heads": 4}, {"gap_buckets": 1},
                                 {"id_dropout": 1.0}, {"id_dropout": -0.1}, {"modal_dropout": 1.0},
                                 {"sequence_impressions": 12}, {"sequence_impressions": -1}])
def test_config_rejects_nonsense(bad):
    with pytest.raises(ValueError):
        tiny(**bad)


def test_wrong_modal_dim_and_too_long_sequences_are_clear_errors():
    model = make_model("ppm")
    batch = random_batch(model.config)
    batch["modal_table"] = torch.randn(9, 25)
    with pytest.raises(ValueError, match="modal_table"):
        model(batch)
    long = random_batch(model.config, L=13)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(long)


# -----------------------------------------------------------------------------
# Masking: absent labels, padding


def test_absent_task_is_left_out_of_the_loss():
    model = make_model("ppm", dropout=0.0)
    batch = random_batch(model.config, B=8)
    batch["label_mask"][:, 2] = False
    batch["labels"][:, 2] = float("nan")  # an absent label may hold anything
    logits, loss = model.train()(batch)
    w = model.config.task_weights
    expected = sum(w[t] * F.binary_cross_entropy_with_logits(logits[:, t], batch["labels"][:, t])
                   for t in (0, 1))
    torch.testing.assert_close(loss, expected)
    loss.backward()
    tower = model.mmoe.towers[2]
    assert all(p.grad is None or not p.grad.any() for p in tower.parameters())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_partially_labelled_task_is_a_mean_over_present_labels():
    model = make_model("idrec")
    batch = random_batch(model.config, B=6)
    batch["label_mask"][:3, 0] = False
    logits, loss = model.eval()(batch)
    w = model.config.task_weights
    expected = (w[0] * F.binary_cross_entropy_with_logits(logits[3:, 0], batch["labels"][3:, 0])
                + sum(w[t] * F.binary_cross_entropy_with_logits(logits[:, t],
                                                                batch["labels"][:, t])
                      for t in (1, 2)))
    torch.testing.assert_close(loss, expected)


def test_no_labels_at_all_is_a_zero_loss_not_nan():
    model = make_model("ppm")
    batch = random_batch(model.config)
    batch["label_mask"][:] = False
    _, loss = model(batch)
    assert loss.item() == 0.0
    loss.backward()


@pytest.mark.parametrize("variant", VARIANTS)
def test_left_padding_and_padded_contents_do_not_change_scores(variant):
    model = make_model(variant)
    batch = random_batch(model.config, L=6, labels=False)
    padded = dict(batch)
    extra = 4
    for key in ("seq_item_id", "seq_action", "seq_gap", "seq_modal_row", "seq_mask"):
        padded[key] = F.pad(batch[key], (extra, 0))  # zeros (False) on the left
    torch.testing.assert_close(scores(model, padded), scores(model, batch), atol=1e-5, rtol=0)
    # Whatever sits under seq_mask == False is not looked at.
    junk = dict(padded)
    g = torch.Generator().manual_seed(3)
    hidden = ~padded["seq_mask"]
    junk["seq_item_id"] = torch.where(hidden, torch.randint(1, 1024, hidden.shape, generator=g),
                                      padded["seq_item_id"])
    junk["seq_action"] = torch.where(hidden, 2, padded["seq_action"])
    junk["seq_gap"] = torch.where(hidden, 5, padded["seq_gap"])
    junk["seq_modal_row"] = torch.where(hidden, 3, padded["seq_modal_row"])
    torch.testing.assert_close(scores(model, junk), scores(model, batch), atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_serving_path_scores_like_the_training_path(variant):
    """Serving runs under inference_mode, where PyTorch takes its fused encoder fast path;
    the scores must be those of the ordinary (autograd) path training uses."""
    model = make_model(variant).eval()
    batch = random_batch(model.config, labels=False)
    with torch.inference_mode():
        fast = model(batch)[0]
    slow = model(batch)[0]
    assert slow.requires_grad
    torch.testing.assert_close(fast, slow.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("length", [0, 1, 6])
@pytest.mark.parametrize("shape", [{}, {"sequence_impressions": 4, "content_affinity": True}])
def test_one_shared_sequence_scores_like_a_sequence_per_candidate(variant, length, shape):
    """Serving passes the user's sequence once, (1, L), for all candidates; the scores must
    be those of the sequence repeated per candidate (the training layout), empty or not."""
    model = make_model(variant, **shape).eval()
    batch = random_batch(model.config, B=7, labels=False)
    L = batch["seq_mask"].shape[1]
    keep = torch.arange(L) >= L - length  # (L,)
    shared = dict(batch)
    for key in ("seq_item_id", "seq_action", "seq_gap", "seq_modal_row"):
        shared[key] = (batch[key][1:2].clamp(min=1) * keep)
    shared["seq_mask"] = keep.unsqueeze(0)
    tiled = {k: v.expand(7, -1) if k.startswith("seq_") else v for k, v in shared.items()}
    with torch.inference_mode():
        torch.testing.assert_close(model(shared)[0], model(tiled)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ["target", "full"])
def test_only_full_attention_lets_the_sequence_see_the_target(attention):
    """The first layer's outputs at the sequence positions, for one sequence and two
    different targets: equal under "target" attention, different under "full"."""
    model = make_model("idrec", attention=attention, n_layers=2).eval()
    batch = random_batch(model.config, B=2, labels=False)
    for key in ("seq_item_id", "seq_action", "seq_gap", "seq_mask"):
        batch[key] = batch[key][1:2].expand(2, -1)  # the same sequence in both rows
    layer = model.id_module.transformer.encoder.layers[0]
    seen = []
    handle = layer.register_forward_hook(lambda mod, args, out: seen.append(out))
    with torch.no_grad():
        model(batch)
    handle.remove()
    L = batch["seq_mask"].shape[1]
    seq_out = seen[0][:, :L][batch["seq_mask"]].view(2, -1, model.config.d_model)
    assert batch["item_id"][0] != batch["item_id"][1] and seq_out.shape[1] > 0
    same = torch.allclose(seq_out[0], seq_out[1], atol=1e-6)
    assert same == (attention == "target")
    with pytest.raises(ValueError, match="attention"):
        tiny("ppm", attention="causal")


def reference_output(transformer, seq: torch.Tensor, target: torch.Tensor, batch: dict,
                     target_attention: bool) -> torch.Tensor:
    """The behaviour transformer written the plain way, with PyTorch's own encoder layers
    holding the same weights: one pass over [sequence, target], the sequence masked from
    the target under target attention."""
    d, n_heads = target.shape[1], transformer.encoder.layers[0].n_heads
    B, L = target.shape[0], seq.shape[1]
    layers = []
    for ours in transformer.encoder.layers:
        layer = torch.nn.TransformerEncoderLayer(
            d, n_heads, ours.linear1.out_features, ours.dropout, activation="gelu",
            batch_first=True, norm_first=True)
        layer.load_state_dict(ours.state_dict())
        layers.append(layer.train(transformer.training))
    pos = torch.arange(L, 0, -1)
    x = torch.cat([seq + transformer.pos_emb(pos) + transformer.gap_emb(batch["seq_gap"])
                   + transformer.action_emb(batch["seq_action"]),
                   (target + transformer.pos_emb.weight[0]).unsqueeze(1)], dim=1)
    kept = torch.cat([batch["seq_mask"], torch.ones(B, 1, dtype=torch.bool)], dim=1)
    allowed = kept.unsqueeze(1).repeat(1, L + 1, 1) | torch.eye(L + 1, dtype=torch.bool)
    if target_attention:
        allowed[:, :L, L] = False
    mask = ~allowed.repeat_interleave(n_heads, dim=0)  # (B * heads, L+1, L+1), True = ignore
    for layer in layers:
        x = layer(x, src_mask=mask)
    return transformer.encoder.norm(x[:, -1])


@pytest.mark.parametrize("attention", ["target", "full"])
@pytest.mark.parametrize("n_layers", [1, 3])
@pytest.mark.parametrize("chunk_rows", [256, 2, 5])  # 5: a last chunk of one row
@pytest.mark.parametrize("left_padded", [True, False])
def test_behavior_transformer_computes_a_plain_encoder_pass(attention, n_layers, chunk_rows,
                                                           left_padded):
    """Target attention skips the target's row in the sequence's attention and the last
    layer's sequence outputs, and runs rows in length-sorted chunks cut to the span they
    need: shortcuts that must give the numbers of a plain masked pass through PyTorch's
    TransformerEncoderLayer, outputs and gradients alike, whatever the mask."""
    model = make_model("idrec", attention=attention, n_layers=n_layers)
    transformer = model.id_module.transformer
    transformer.chunk_rows = chunk_rows
    batch = random_batch(model.config, B=6, L=7)
    if not left_padded:  # holes anywhere (the contract says left-padded; be exact anyway)
        batch["seq_mask"] = torch.rand(6, 7, generator=torch.Generator().manual_seed(1)) < 0.5
        batch["seq_mask"][0] = False
    seq = torch.randn(6, 7, model.config.d_model, requires_grad=True)
    target = torch.randn(6, model.config.d_model, requires_grad=True)
    ours = transformer(seq, target, batch)
    plain = reference_output(transformer, seq, target, batch, attention == "target")
    torch.testing.assert_close(ours, plain, atol=1e-5, rtol=1e-5)
    grads = [torch.autograd.grad(out.square().sum(), (seq, target)) for out in (ours, plain)]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_recency_action_and_order_matter():
    model = make_model("idrec")
    batch = random_batch(model.config, labels=False)
    base = scores(model, batch)
    for key, value in (("seq_gap", 1), ("seq_action", 3)):
        changed = dict(batch, **{key: torch.where(batch["seq_mask"], value, 0)})
        assert not torch.allclose(scores(model, changed), base)
    flipped = dict(batch)
    for key in ("seq_item_id", "seq_action", "seq_gap"):
        flipped[key] = batch[key].clone()
        flipped[key][:, -2:] = batch[key][:, -2:].flip(1)
    full = batch["seq_mask"][:, -2:].all(1)
    assert full.any()
    assert not torch.allclose(scores(model, flipped)[full], base[full])


def test_a_model_reading_impressions_has_their_action_and_older_ones_have_none():
    shown = make_model("ppm", sequence_impressions=4)
    for transformer in (shown.id_module.transformer, shown.ppm.transformer):
        assert transformer.action_emb.num_embeddings == N_ACTIONS + 1  # IMPRESSION_CODE
    assert make_model("ppm").ppm.transformer.action_emb.num_embeddings == N_ACTIONS
    batch = random_batch(shown.config, labels=False)
    base = scores(shown, batch)
    impressions = dict(batch, seq_action=torch.where(batch["seq_mask"], IMPRESSION_CODE, 0))
    assert torch.isfinite(scores(shown, impressions)).all()
    assert not torch.allclose(scores(shown, impressions), base)
    # The content affinity: the target's cosine with what the user took and was shown.
    near = make_model("ppm", sequence_impressions=4, content_affinity=True).eval()
    batch = random_batch(near.config, B=2, labels=False)
    batch["seq_mask"][:] = True
    batch["seq_action"][:] = torch.tensor([[IMPRESSION_CODE] * 6, [1] * 3 + [IMPRESSION_CODE] * 3])
    batch["target_modal_row"] = torch.tensor([1, 2])
    batch["seq_modal_row"][:] = batch["target_modal_row"][:, None]  # the target itself
    with torch.no_grad():
        took, passed_over = near.ppm(batch)[:, -2:].T
    torch.testing.assert_close(passed_over, torch.ones(2))
    torch.testing.assert_close(took, torch.tensor([0.0, 1.0]))  # none taken: 0
    # Centred: a vector equal to the centre is no direction at all.
    near.ppm.modal_centre.copy_(batch["modal_table"][1])
    with torch.no_grad():
        assert near.ppm(batch)[0, -2:].abs().max() == 0
    # And the wide part reads them beside the rates.
    assert near.wide.in_features == near.config.n_rates + 2
    # A checkpoint from before impressions reads none.
    d = shown.config.to_dict()
    del d["sequence_impressions"]
    assert RankerConfig.from_dict(d).sequence_impressions == 0


# -----------------------------------------------------------------------------
# Modal inputs: the missing vector, which variant reads what


def test_missing_vectors_give_finite_scores_and_train_the_missing_vector():
    model = make_model("ppm")
    batch = random_batch(model.config)
    batch["target_modal_row"][:] = 0
    batch["seq_modal_row"][:] = 0
    batch["modal_table"] = batch["modal_table"][:1]  # nothing embedded: only the placeholder
    logits, loss = model.train()(batch)
    assert torch.isfinite(logits).all()
    loss.backward()
    assert model.ppm.missing.grad is not None and model.ppm.missing.grad.abs().sum() > 0
    # Row 0's content is never used.
    before = scores(model, batch)
    batch["modal_table"] = torch.full_like(batch["modal_table"], 1e6)
    torch.testing.assert_close(scores(model, batch), before)


def test_row_zero_content_is_ignored_and_float16_tables_work():
    model = make_model("modal")
    batch = random_batch(model.config, labels=False)
    changed = dict(batch, modal_table=batch["modal_table"].clone())
    changed["modal_table"][0] = 123.0
    torch.testing.assert_close(scores(model, changed), scores(model, batch))
    half = dict(batch, modal_table=batch["modal_table"].half())
    torch.testing.assert_close(scores(model, half), scores(model, batch), atol=1e-2, rtol=0)


def test_idrec_ignores_modal_inputs():
    model = make_model("idrec")
    batch = random_batch(model.config, labels=False)
    other = random_batch(model.config, M=4, seed=7, labels=False)
    changed = dict(batch, **{k: other[k] for k in
                             ("modal_table", "target_modal_row", "seq_modal_row")})
    torch.testing.assert_close(scores(model, changed), scores(model, batch))
    without = {k: v for k, v in batch.items() if "modal" not in k}
    torch.testing.assert_close(scores(model, without), scores(model, batch))


def test_modal_ignores_ids():
    model = make_model("modal")
    batch = random_batch(model.config, labels=False)
    other = random_batch(model.config, seed=7, labels=False)
    ids = ("item_id", "category", "brand", "shop", "price_bucket", "user_id", "item_rates",
           "taste_rates", "user_rates")
    changed = dict(batch, **{k: other[k] for k in ids})
    changed["seq_item_id"] = torch.where(batch["seq_mask"], other["seq_item_id"] % 1023 + 1, 0)
    torch.testing.assert_close(scores(model, changed), scores(model, batch))
    without = {k: v for k, v in batch.items() if k not in (*ids, "seq_item_id")}
    torch.testing.assert_close(scores(model, without), scores(model, batch))


def test_ppm_reads_both():
    model = make_model("ppm")
    batch = random_batch(model.config, labels=False)
    base = scores(model, batch)
    assert not torch.allclose(scores(model, dict(batch, item_id=batch["item_id"] % 1023 + 1)),
                              base)
    table = batch["modal_table"].flip(0)
    assert not torch.allclose(scores(model, dict(batch, modal_table=table)), base)


def test_modal_weights_plug_into_a_ppm_model():
    """The paper's plug-in step: a modal-only model's PPM module loads into the unified one."""
    modal, ppm = make_model("modal", seed=1), make_model("ppm", seed=2)
    pretrained = {k: v for k, v in modal.state_dict().items() if k.startswith("ppm.")}
    result = ppm.load_state_dict(pretrained, strict=False)
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if k.startswith("ppm.")]
    for name, p in modal.ppm.named_parameters():
        torch.testing.assert_close(ppm.ppm.get_parameter(name), p)


# -----------------------------------------------------------------------------
# Determinism, checkpoints


def test_id_dropout_hides_target_ids_in_training_only():
    model = make_model("ppm", id_dropout=0.5)
    batch = random_batch(model.config, B=64, labels=False)
    # A new item: no id and no click history.
    unknown = {**batch, "item_id": torch.zeros_like(batch["item_id"]),
               "item_rates": torch.zeros_like(batch["item_rates"])}
    model.eval()  # eval: every id is read, the scores are deterministic
    assert torch.equal(scores(model, batch), scores(model, batch))
    assert not torch.allclose(scores(model, batch), scores(model, unknown))
    # Training: dropout off everywhere else, so a hidden id scores exactly like "unknown".
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    torch.manual_seed(3)
    with torch.no_grad():
        trained, known, hidden = model(batch)[0], model.eval()(batch)[0], model(unknown)[0]
    as_hidden = torch.isclose(trained, hidden, atol=1e-6).all(1)
    as_known = torch.isclose(trained, known, atol=1e-6).all(1)
    assert (as_hidden | as_known).all()
    assert 0.25 < as_hidden.float().mean() < 0.75  # about half of the ids were hidden


def test_modal_dropout_masks_the_cached_vectors_in_training_only():
    model, plain = make_model("ppm", modal_dropout=0.5), make_model("ppm")  # same weights
    batch = random_batch(model.config, B=16, M=40, labels=False)
    assert torch.equal(scores(model, batch), scores(plain, batch))  # eval: no mask
    for m in (*model.modules(), *plain.modules()):  # only the vectors' mask left
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    model.train(), plain.train()
    table = batch["modal_table"]
    with torch.no_grad():
        torch.manual_seed(5)
        masked = model(batch)[0]
        torch.manual_seed(5)  # the same mask, drawn by hand over the rows after "missing"
        rows = F.dropout(table[1:], 0.5)
        by_hand = plain({**batch, "modal_table": torch.cat([table[:1], rows])})[0]
        unmasked = plain(batch)[0]
    dropped = (rows == 0).float().mean(dim=1)  # (M - 1,): each vector's share
    assert (dropped > 0.1).all() and (dropped < 0.9).all()
    torch.testing.assert_close(masked, by_hand)
    assert not torch.allclose(masked, unmasked)
    # A frozen plug-in learns nothing from the vectors: no mask, only noise downstream.
    model.ppm.proj.requires_grad_(False)
    with torch.no_grad():
        torch.testing.assert_close(model(batch)[0], unmasked)
    # Half-precision caches are masked too (cast first, as the projection reads them).
    model.ppm.proj.requires_grad_(True)
    half = {**batch, "modal_table": table.half()}
    with torch.no_grad():
        assert torch.isfinite(model(half)[0]).all()
        assert not torch.allclose(model(half)[0], model(half)[0])


def test_same_seed_same_model_same_training_step():
    a, b = make_model("ppm", seed=3), make_model("ppm", seed=3)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    batch = random_batch(a.config)
    torch.manual_seed(5)
    loss_a = a.train()(batch)[1]
    torch.manual_seed(5)
    loss_b = b.train()(batch)[1]
    assert torch.equal(loss_a, loss_b)
    assert not torch.equal(make_model("ppm", seed=4).mmoe.gates[0].weight, a.mmoe.gates[0].weight)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", [{}, {"sequence_impressions": 4, "content_affinity": True}])
def test_checkpoint_round_trip(tmp_path, variant, shape):
    model = make_model(variant, **shape)
    if model.config.content_affinity:  # the centre travels with the weights
        model.ppm.modal_centre.normal_()
    batch = random_batch(model.config, labels=False)
    # Train a step so the weights differ from any fresh init.
    model.train()(random_batch(model.config))[1].backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    model.trained_tasks = ("click", "collect")
    path = tmp_path / "model.pt"
    extra = {"version": "v000001", "windows": ["a", "b"], "auc": 0.7, "n": 3, "none": None,
             "nested": {"offsets": [1, 2]}, "tensor": torch.arange(3)}
    save_checkpoint(path, model, extra)
    loaded, got = load_checkpoint(path)
    assert not loaded.training
    assert loaded.config == model.config and loaded.trained_tasks == ("click", "collect")
    assert got.keys() == extra.keys() and torch.equal(got.pop("tensor"), extra.pop("tensor"))
    assert got == extra
    assert torch.equal(scores(loaded, batch), scores(model, batch))
    if model.config.content_affinity:
        assert torch.equal(loaded.ppm.modal_centre, model.ppm.modal_centre)


def test_checkpoint_refuses_extras_that_weights_only_loading_would_refuse(tmp_path):
    from pathlib import Path

    model = make_model("modal")
    for bad in ({"path": Path("x")}, {"arr": np.zeros(2)}, {"x": [{"y": object()}]}):
        with pytest.raises(TypeError):
            save_checkpoint(tmp_path / "m.pt", model, bad)


def test_config_dict_round_trip_and_older_dicts_get_defaults():
    c = tiny("modal", task_weights=(2.0, 1.0, 0.0))
    d = c.to_dict()
    assert isinstance(d["tasks"], list)
    assert RankerConfig.from_dict(d) == c
    older = {k: v for k, v in d.items() if k != "tower_dim"}
    assert RankerConfig.from_dict(older).tower_dim == RankerConfig().tower_dim
    with pytest.raises(ValueError, match="unknown"):
        RankerConfig.from_dict({**d, "new_field": 1})
    # Checkpoints from before the attention option were trained with full attention.
    assert RankerConfig.from_dict({k: v for k, v in d.items() if k != "attention"}
                                  ).attention == "full"


def test_a_checkpoint_from_before_user_ids_loads_as_a_model_without_them(tmp_path):
    old = make_model("idrec", user_buckets=0)  # the shape of such a model
    assert old.id_module.user_emb is None
    ckpt = {"format": CHECKPOINT_FORMAT,
            "config": {k: v for k, v in old.config.to_dict().items() if k != "user_buckets"},
            "state_dict": old.state_dict(), "extra": {}, "item_vocabulary": None}
    torch.save(ckpt, tmp_path / "old.pt")
    loaded, _ = load_checkpoint(tmp_path / "old.pt")
    assert loaded.config.user_buckets == 0 and loaded.user_vocabulary is None
    assert loaded.trained_tasks == loaded.config.tasks  # every head, as served then
    batch = random_batch(loaded.config, labels=False)
    torch.testing.assert_close(scores(loaded, batch), scores(old, batch))
    # Its scores do not depend on the user.
    torch.testing.assert_close(scores(loaded, dict(batch, user_id=batch["user_id"] + 1)),
                               scores(loaded, batch))


# -----------------------------------------------------------------------------
# Random shapes and masks

@functools.cache
def shared_model(variant: str) -> UnifiedRanker:
    return make_model(variant)


@settings(max_examples=40, deadline=None)
@given(variant=st.sampled_from(VARIANTS), B=st.integers(1, 6), L=st.integers(1, 12),
       M=st.integers(1, 8), seed=st.integers(0, 2**16), train=st.booleans(),
       label_density=st.floats(0, 1))
def test_random_shapes_and_masks_give_finite_outputs(variant, B, L, M, seed, train,
                                                     label_density):
    model = shared_model(variant).train(train)
    c = model.config
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, L, generator=g) < torch.rand(1, generator=g)  # any pattern, any row
    batch = random_batch(c, B=B, L=L, M=M, seed=seed)
    batch["seq_mask"] = mask
    batch["seq_modal_row"] = torch.randint(0, M, (B, L), generator=g)
    batch["label_mask"] = torch.rand(B, 3, generator=g) < label_density
    logits, loss = model(batch)
    assert logits.shape == (B, 3)
    assert torch.isfinite(logits).all() and torch.isfinite(loss)
    loss.backward()
    model.zero_grad(set_to_none=True)


# -----------------------------------------------------------------------------
# The cold-start point of the paper, in miniature


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    ranks = np.empty(len(scores))
    ranks[np.argsort(scores)] = np.arange(1, len(scores) + 1)
    pos = labels == 1
    n1, n0 = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def topic_world(seed: int = 0, n_topics: int = 6, n_items: int = 300, dim: int = 24):
    """Items 1..n_items are seen in training, n_items+1..2*n_items only at test time (new
    items). Each item belongs to a topic; its modal vector is the topic's centre plus noise,
    and its modal row equals its id. Nothing else (category, brand, shop) gives the topic."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_topics, dim, generator=g)
    topic = torch.randint(0, n_topics, (2 * n_items + 1,), generator=g)
    table = centres[topic] + 0.3 * torch.randn(2 * n_items + 1, dim, generator=g)
    return g, topic, table


def topic_samples(g, topic, table, n: int, targets: torch.Tensor, L: int = 8):
    """Users like two topics; their last L interactions are seen items of those topics.
    click = 1 iff the target's topic is liked (half of the samples)."""
    n_topics = int(topic.max()) + 1
    seen = torch.arange(1, (len(topic) - 1) // 2 + 1)
    liked = torch.zeros(n, n_topics, dtype=torch.bool)
    liked.scatter_(1, torch.stack([torch.randperm(n_topics, generator=g)[:2]
                                   for _ in range(n)]), True)

    def pick(pool, ok):  # one id per row, from pool, of an allowed topic
        weights = ok[:, topic[pool]].float()  # (n, len(pool))
        return pool[torch.multinomial(weights, 1, generator=g).squeeze(1)]

    seq = torch.stack([pick(seen, liked) for _ in range(L)], dim=1)  # (n, L)
    click = torch.rand(n, generator=g) < 0.5
    target = torch.where(click, pick(targets, liked), pick(targets, ~liked))
    zeros = torch.zeros(n, dtype=torch.long)
    labels = torch.zeros(n, 3)
    labels[:, 0] = click.float()
    label_mask = torch.zeros(n, 3, dtype=torch.bool)
    label_mask[:, 0] = True  # only clicks are labelled here
    return {"item_id": target, "category": zeros, "brand": zeros, "shop": zeros,
            "price_bucket": zeros, "user_id": zeros, "item_rates": torch.zeros(n, 2),
            "taste_rates": torch.zeros(n, 4), "user_rates": torch.zeros(n, 2), "seq_item_id": seq,
            "seq_action": torch.ones_like(seq),
            "seq_gap": torch.randint(1, 8, seq.shape, generator=g),
            "seq_mask": torch.ones_like(seq, dtype=torch.bool), "modal_table": table,
            "target_modal_row": target, "seq_modal_row": seq, "labels": labels,
            "label_mask": label_mask}


def test_modal_vectors_score_unseen_items_that_ids_cannot():
    g, topic, table = topic_world()
    train = topic_samples(g, topic, table, 4096, torch.arange(1, 301))
    test = topic_samples(g, topic, table, 1024, torch.arange(301, 601))  # new item ids
    result = {}
    for variant in VARIANTS:
        model = make_model(variant)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        order = torch.Generator().manual_seed(1)
        model.train()
        for _ in range(120):
            idx = torch.randint(0, 4096, (256,), generator=order)
            _, loss = model({k: v if k == "modal_table" else v[idx] for k, v in train.items()})
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        result[variant] = {name: auc(data["labels"][:, 0].numpy(),
                                     scores(model, data)[:, 0].numpy())
                           for name, data in (("seen", train), ("new", test))}
    assert result["idrec"]["seen"] > 0.65, result  # IDs do learn the items they have seen,
    assert result["idrec"]["new"] < 0.6, result  # but know nothing about new ones;
    assert result["modal"]["new"] > 0.95, result  # modal vectors carry over to new items,
    assert result["ppm"]["new"] > 0.9, result  # and so does the unified model.


@pytest.mark.parametrize("variant", ["idrec", "ppm"])
def test_the_wide_part_starts_as_the_sum_of_the_click_rate_lifts(variant):
    model = make_model(variant, wide_rates=True)
    batch = random_batch(model.config, labels=False)
    with_wide = scores(model, batch)
    with torch.no_grad():
        model.wide.weight.zero_()
    lifts = batch["item_rates"][:, 0] + batch["user_rates"][:, 0]  # (B,)
    torch.testing.assert_close(with_wide - scores(model, batch),
                               lifts.unsqueeze(1).expand_as(with_wide))
    # Id dropout hides a dropped item's history from the wide part as from the rest; the
    # user's, and the user's taste for the item's kind, stay.
    model = make_model(variant, wide_rates=True, id_dropout=0.999999).train()
    _, rates = model.id_module(batch)
    assert not rates[:, :2].any() and torch.equal(rates[:, 2:4], batch["user_rates"])
    assert torch.equal(rates[:, 4:], batch["taste_rates"])


def test_the_wide_part_trains_and_travels_in_the_checkpoint(tmp_path):
    model = make_model("ppm", wide_rates=True).train()
    _, loss = model(random_batch(model.config))
    loss.backward()
    assert model.wide.weight.grad is not None and model.wide.weight.grad.abs().sum() > 0
    with torch.no_grad():
        model.wide.weight.add_(0.5)  # not the initial weights any more
    save_checkpoint(tmp_path / "m.pt", model, {})
    loaded, _ = load_checkpoint(tmp_path / "m.pt")
    assert loaded.config.wide_rates and torch.equal(loaded.wide.weight, model.wide.weight)
    batch = random_batch(model.config, labels=False)
    torch.testing.assert_close(scores(loaded, batch), scores(model, batch))


def test_the_wide_part_is_only_where_click_rates_are_read():
    assert tiny().wide_rates and make_model("idrec").wide is not None  # on by default
    for no_rates in ({"id_rates": False}, {"variant": "modal"}):
        assert not tiny(**{"wide_rates": True, **no_rates}).wide_rates
        assert make_model(**{"wide_rates": True, **no_rates}).wide is None
    old = make_model("idrec").config.to_dict()
    del old["wide_rates"]  # a checkpoint from before the wide part
    assert RankerConfig.from_dict(old).wide_rates is False


@pytest.mark.parametrize(("n_experts", "tasks", "B"),
                         [(4, ("click", "order", "collect"), 7), (1, ("click",), 1),
                          (3, ("click", "order"), 0)])
def test_mmoe_is_its_modules_one_by_one(n_experts, tasks, B):
    """The MMoE runs as batched products over its stacked weights; the function is that of
    its modules applied one at a time (experts, a softmax gate and a tower per task), and
    every one of their parameters gets a gradient."""
    from trainer.model import MMoE

    torch.manual_seed(0)
    mmoe = MMoE(10, RankerConfig(n_experts=n_experts, tasks=tasks,
                                 task_weights=(1.0,) * len(tasks))).eval()
    x = torch.randn(B, 10)
    experts = torch.stack([e(x) for e in mmoe.experts], dim=1)  # (B, E, H)
    want = torch.cat([t(torch.einsum("be,beh->bh", torch.softmax(g(x), -1), experts))
                      for g, t in zip(mmoe.gates, mmoe.towers, strict=True)], dim=1)
    got = mmoe(x)
    assert got.shape == (B, len(tasks))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if B:
        mmoe.train()(x).sum().backward()
        for name, p in mmoe.named_parameters():  # a gate over one expert is constant
            assert p.grad is not None and (p.grad.abs().sum() > 0 or (
                n_experts == 1 and name.startswith("gates"))), name


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_id_tables_learn_at_their_share_of_the_learning_rate(variant):
    """With ``id_lr_scale`` the item and user tables take that share of every step (Adam's
    first step moves a weight by ``lr`` times the sign of its gradient, decay included);
    every other weight takes the same step as without it. ``modal`` has no id tables."""
    from trainer.train import adamw, id_tables

    batch = random_batch(tiny(variant))
    moves = {}
    for scale in (1.0, 0.1):
        model = make_model(variant, seed=3).train()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        optimizer = adamw(model, lr=1e-2, weight_decay=1e-2, id_lr_scale=scale)
        torch.manual_seed(5)  # the same dropout masks in both runs
        model(batch)[1].backward()
        optimizer.step()
        moves[scale] = {n: p.detach() - before[n] for n, p in model.named_parameters()}
    probe = make_model(variant)
    tables = {n for n, p in probe.named_parameters() if any(p is t for t in id_tables(probe))}
    assert tables == (set() if variant == "modal" else
                      {"id_module.item_emb.weight", "id_module.user_emb.weight"})
    for name, full in moves[1.0].items():
        if name in tables:
            ids = batch["item_id" if "item" in name else "user_id"].flatten()
            ids = ids[ids > 0]
            # The batch's rows moved by about lr, not just by the decay (lr * 1e-2 * ~0.02).
            assert ids.numel() and (full[ids].abs().amax(dim=1) > 1e-3).all(), name
            torch.testing.assert_close(moves[0.1][name], 0.1 * full, rtol=1e-3, atol=1e-7)
        else:
            torch.testing.assert_close(moves[0.1][name], full, rtol=0, atol=0)
