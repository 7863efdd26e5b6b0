"""Encoder fine-tuning: query matching (QM) pairs, loss, training and the command."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from encoders.query_matching import (
    CatalogTexts,
    QMConfig,
    QueryPair,
    contrastive_loss,
    finetune,
    next_click_pairs,
    query_pairs,
    retrieval,
)
from ppm.config import Config
from ppm.events import ItemEvent, ItemOp

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _us(t: datetime) -> int:
    return int(t.timestamp() * 1_000_000)


def _item(item_id: str, title: str, hours: float, op: ItemOp = ItemOp.UPSERT) -> ItemEvent:
    content = {"title": title, "category": "coats"} if op is ItemOp.UPSERT else {}
    return ItemEvent(item_id=item_id, op=op, event_time=T0 + timedelta(hours=hours), **content)


def test_item_texts_are_read_as_of_the_impression():
    texts = CatalogTexts([_item("a", "Acme black coat", 0), _item("a", "Acme red coat", 5),
                          _item("b", "Bolt coat", 2), _item("b", "", 4, ItemOp.DELETE)])
    assert texts.at("a", _us(T0 + timedelta(hours=1))).startswith("Acme black coat.")
    assert texts.at("a", _us(T0 + timedelta(hours=5))).startswith("Acme red coat.")
    assert texts.at("b", _us(T0 + timedelta(hours=1))) is None  # not listed yet
    assert texts.at("b", _us(T0 + timedelta(hours=4))) is None  # deleted
    assert texts.at("zz", _us(T0)) is None
    assert set(texts.as_of(_us(T0 + timedelta(hours=3)))) == {"a", "b"}
    assert set(texts.as_of(_us(T0 + timedelta(hours=6)))) == {"a"}


def test_pairs_are_the_clicked_search_results_with_a_skipped_item_of_the_same_page():
    texts = CatalogTexts([_item(i, f"{i} coat", 0) for i in "abcd"] + [_item("e", "e coat", 9)])
    at = T0 + timedelta(hours=1)
    log = pd.DataFrame([
        # a search page: a clicked, b skipped, e (not listed until hour 9) clicked
        ("r1", "a", "black coat", 1, at), ("r1", "b", "black coat", 0, at),
        ("r1", "e", "black coat", 1, at),
        # a search page where everything was clicked: no hard negative
        ("r2", "c", "red coat", 1, at),
        # browsing (no query): never a pair
        ("r3", "d", None, 1, at), ("r3", "a", None, 0, at),
    ], columns=["request_id", "item_id", "query", "click", "impression_time"])
    pairs = query_pairs(log, texts)
    assert [(p.query, p.clicked_id, p.shown_id) for p in pairs] == [
        ("black coat", "a", "b"), ("red coat", "c", None)]
    assert pairs[0].clicked.startswith("a coat.") and pairs[0].shown.startswith("b coat.")


def test_next_click_pairs_follow_each_users_earlier_click_with_a_skipped_item_as_negative():
    texts = CatalogTexts([_item(i, f"{i} coat", 0) for i in "abcdfg"] + [_item("e", "e coat", 9)])

    def at(hours: float) -> datetime:
        return T0 + timedelta(hours=hours)

    log = pd.DataFrame([
        # u1: a, (b shown, not clicked), c, c again (the same item: no pair), e (not listed
        # until hour 9: no pair, nor a query for the next), then f after e
        ("u1", "c", 1, at(3)), ("u1", "a", 1, at(1)), ("u1", "b", 0, at(2)),
        ("u1", "c", 1, at(4)), ("u1", "e", 1, at(5)), ("u1", "f", 1, at(6)),
        # u2: one click, nothing before it: no pair
        ("u2", "d", 1, at(1)),
        # u3: g then a, nothing skipped: no hard negative
        ("u3", "g", 1, at(1)), ("u3", "a", 1, at(7)),
    ], columns=["user_id", "item_id", "click", "impression_time"])
    pairs = next_click_pairs(log, texts)
    assert [(p.query.split(".")[0], p.clicked_id, p.shown_id) for p in pairs] == [
        ("a coat", "c", "b"), ("g coat", "a", None)]
    assert pairs[0].clicked.startswith("c coat.") and pairs[0].shown.startswith("b coat.")
    # From hour 6.5 on: u3's click at hour 7 still follows its click at hour 1.
    later = next_click_pairs(log, texts, since_us=_us(at(6.5)))
    assert [(p.query.split(".")[0], p.clicked_id, p.shown_id) for p in later] == [
        ("g coat", "a", None)]


def test_the_loss_does_not_push_away_the_same_item_or_another_click_for_the_same_query():
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(3, 4), dim=1)
    docs = torch.nn.functional.normalize(torch.randn(5, 4), dim=1)
    ids, queries = ["x", "y", "z", "x", "w"], ["coat", "coat", "shoe"]
    # Rows 0 and 1 search "coat", for which x and y were clicked: for each, the other's
    # click and doc 3 (x again, as some pair's hard negative) are masked, not pushed away.
    # Row 2 ("shoe") has no such rows: every other doc is a negative.
    row0 = torch.nn.functional.cross_entropy(
        (q[:1] @ docs.T / 0.1).masked_fill(torch.tensor([[False, True, False, True, False]]),
                                           float("-inf")), torch.tensor([0]))
    row1 = torch.nn.functional.cross_entropy(
        (q[1:2] @ docs.T / 0.1).masked_fill(torch.tensor([[True, False, False, True, False]]),
                                            float("-inf")), torch.tensor([1]))
    row2 = torch.nn.functional.cross_entropy(q[2:] @ docs.T / 0.1, torch.tensor([2]))
    loss = contrastive_loss(q, docs, ids, queries, temperature=0.1)
    assert torch.allclose(loss, (row0 + row1 + row2) / 3)


def test_retrieval_ranks_the_clicked_item_among_all_candidates():
    from encoders.text_encoder import TextEncoder

    enc = TextEncoder()
    candidates = {"a": "red leather boots", "b": "blue cotton shirt", "c": "green wool scarf"}
    pairs = [QueryPair("red boots", "", "a"), QueryPair("wool scarf", "", "c"),
             QueryPair("shirt", "", "gone")]  # not a candidate: left out
    got = retrieval(enc.model, enc.tokenizer, pairs, candidates, k=1)
    assert got == {"recall_at_k": 1.0, "mrr": 1.0, "n": 2, "k": 1}


def test_fine_tuning_learns_pairs_the_pretrained_encoder_cannot_match():
    """Codes that name nothing in their item's title: the pretrained model ranks them at
    chance; a few epochs on the pairs teach them, and the best epoch is kept."""
    from encoders.text_encoder import TextEncoder

    enc = TextEncoder()
    titles = ["Acme red wool coat", "Bolt blue denim jeans", "Crest green silk scarf",
              "Delta black leather boots", "Ember white cotton shirt", "Fable grey linen dress",
              "Gale brown suede bag", "Haven pink knit sweater"]
    candidates = {f"i{k}": t for k, t in enumerate(titles)}
    pairs = [QueryPair(f"code {k}", t, f"i{k}", titles[(k + 1) % 8], f"i{(k + 1) % 8}")
             for k, t in enumerate(titles)]
    result = finetune(enc, pairs * 4, pairs, candidates,
                      QMConfig(epochs=4, batch_size=8, lr=1e-4, k=1, seed=0))
    assert result.best_epoch >= 1
    assert result.after["recall_at_k"] > result.before["recall_at_k"] + 0.3, result
    assert retrieval(enc.model, enc.tokenizer, pairs, candidates, k=1) == result.after
    assert not any(p.requires_grad for p in enc.model.parameters())  # frozen again


@pytest.mark.parametrize("option, error", [({"pairs": "views"}, "pairs must be one of"),
                                           ({"k": 0}, "k must be at least 1"),
                                           ({"epochs": 0}, "epochs must be at least 1")])
def test_finetune_text_refuses_unknown_pairs_or_epochs_or_k_below_one(tmp_path, option, error):
    from trainer.finetune import finetune_text

    with pytest.raises(ValueError, match=error):
        finetune_text(Config(data_dir=tmp_path), [], **option)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_ppm_finetune_text_trains_on_the_training_period_and_writes_a_new_encoder(
        tmp_path, item_encoder, capsys, monkeypatch):
    from encoders.text_encoder import PACKAGED_MODEL_DIST, TextEncoder
    from ppm.cli.commands import main
    from streams.local_runner import LocalRunner
    from streams.sources.shop_simulator import ShopSimulator
    from trainer.finetune import encoder_periods, read_log
    from trainer.train import split_windows

    world = {"days": 2.0, "n_users": 150, "initial_items": 60, "items_per_day": 40,
             "search_share": 0.6}
    cfg = Config(data_dir=tmp_path, simulator=world, pipeline={"log_window_s": 4 * 3600.0})
    LocalRunner(cfg, encoder=item_encoder, resume=False).run(
        ShopSimulator(cfg.simulator).records(), "qm", progress=False)
    (tmp_path / "ppm.toml").write_text(
        "[simulator]\n" + "".join(f"{k} = {v}\n" for k, v in world.items())
        + "[pipeline]\nlog_window_s = 14400.0\n")
    code = main(["--config", str(tmp_path / "ppm.toml"), "--data-dir", str(tmp_path),
                 "finetune", "text", "--simulate", "--epochs", "1", "--quiet"])
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    out = tmp_path / "encoders" / "text-qm"
    assert report["out"] == str(out) and (tmp_path / "encoders" / "text-qm.finetune.json").is_file()
    assert report["encoder_before"].startswith(PACKAGED_MODEL_DIST)
    assert report["encoder_after"] == TextEncoder(out).identity != report["encoder_before"]
    # Trained on the training period's clicked searches, judged on the test period's.
    split = split_windows(cfg, 0.2, 0.1)
    searched = [read_log(w) for w in (split.train, split.test)]
    clicked = [int(((f["query"].notna()) & (f["click"] == 1)).sum()) for f in searched]
    assert 0 < report["pairs"]["train"] <= clicked[0]
    assert 0 < report["pairs"]["test"] <= clicked[1]
    # Judged on every test pair whose item is still listed at the period's end.
    assert 0 < report["test_before"]["n"] == report["test_after"]["n"] <= report["pairs"]["test"]
    for period in ("valid_before", "valid_after", "test_before", "test_after"):
        assert 0 <= report[period]["recall_at_k"] <= 1
    # The kept epoch is the best on validation, the pretrained model included.
    assert report["valid_after"]["recall_at_k"] >= report["valid_before"]["recall_at_k"]

    # Without the queries: each user's next click after an earlier one.
    code = main(["--config", str(tmp_path / "ppm.toml"), "--data-dir", str(tmp_path),
                 "finetune", "text", "--simulate", "--pairs", "next-click", "--epochs", "1",
                 "--k", "25", "--quiet"])
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    out = tmp_path / "encoders" / "text-next-click"
    assert report["kind"] == "next-click" and report["out"] == str(out)
    assert report["settings"]["k"] == 25
    assert {report[p]["k"] for p in ("valid_before", "valid_after", "test_after")} == {25}
    assert report["encoder_after"] == TextEncoder(out).identity != report["encoder_before"]
    logs = [read_log(w) for w in (split.train, split.valid, split.test)]
    for period, log in zip(("train", "valid", "test"), logs, strict=True):
        assert 0 < report["pairs"][period] <= int((log["click"] == 1).sum())
    assert report["valid_after"]["recall_at_k"] >= report["valid_before"]["recall_at_k"]
    assert report["period"] == "test" and report["periods"] == encoder_periods(split)

    # --validation: the split ppm eval --validation uses, one period back; the test period
    # is not read (its "test" pairs are the validation period's).
    import trainer.finetune

    read = []
    monkeypatch.setattr(trainer.finetune, "read_log",
                        lambda windows: read.extend(windows) or read_log(windows))
    code = main(["--config", str(tmp_path / "ppm.toml"), "--data-dir", str(tmp_path),
                 "finetune", "text", "--simulate", "--pairs", "next-click", "--epochs", "1",
                 "--k", "25", "--validation", "--quiet"])
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    back = split_windows(cfg, 0.2, 0.1, "validation")
    assert report["out"] == str(tmp_path / "encoders" / "text-next-click-validation")
    assert report["period"] == "validation" and report["periods"] == encoder_periods(back)
    assert back.test[-1].end_us <= split.test_start_us
    assert read and not {w.name for w in read} & {w.name for w in split.test}
    logs = [read_log(w) for w in (back.train, back.valid, back.test)]
    for period, log in zip(("train", "valid", "test"), logs, strict=True):
        assert 0 < report["pairs"][period] <= int((log["click"] == 1).sum())


def test_entity_photos_are_the_test_split_rendered_with_labelled_colours_and_patterns():
    from streams.sources.shop_simulator import (
        COLOURS,
        DEFAULT_FASHION_MNIST,
        PATTERNS,
        _fashion_mnist,
        entity_photos,
    )

    photos, labels = entity_photos(seed=3)
    assert photos.shape == (10_000, 28, 28, 3) and photos.dtype == "uint8"
    assert set(labels) == {"class", "colour", "pattern"}
    assert labels["class"].max() == 9 and labels["colour"].max() == len(COLOURS) - 1
    assert labels["pattern"].max() == len(PATTERNS) - 1
    # Disjoint from the item photos: none of the test split's pictures is a training one.
    train = {p.tobytes() for p in _fashion_mnist(Path(DEFAULT_FASHION_MNIST), "train")[0][:5000]}
    test = _fashion_mnist(Path(DEFAULT_FASHION_MNIST), "t10k")[0]
    assert not any(p.tobytes() in train for p in test[:500])
    plain, labels_v1 = entity_photos(patterns=False, seed=3)
    assert plain.shape == photos.shape and not (plain == photos).all()
    assert set(labels_v1) == {"class", "colour"}
    assert (labels_v1["colour"] == labels["colour"]).all()


def test_entity_prediction_keeps_the_best_epoch_and_writes_weights_that_load_strictly(tmp_path):
    import numpy as np

    from encoders.entity_prediction import EPConfig, save_weights
    from encoders.entity_prediction import finetune as ep_finetune
    from encoders.image_encoder import ImageEncoder, packaged_efficientnet_weights
    from streams.sources.shop_simulator import entity_photos

    photos, labels = entity_photos(seed=0)
    photos, labels = photos[:160], {k: v[:160] for k, v in labels.items()}
    enc = ImageEncoder(image_size=32)
    before = enc.encode([Image.fromarray(p) for p in photos[:4]])
    split = {"train": np.arange(0, 96), "valid": np.arange(96, 128), "test": np.arange(128, 160)}
    result = ep_finetune(enc, photos, labels, split,
                         EPConfig(epochs=2, batch_size=16, probe_epochs=5, lr=1e-3))
    assert set(result.before) == {"class", "colour", "pattern", "mean"}
    assert result.valid_after["mean"] >= result.valid_before["mean"]
    assert not any(p.requires_grad for p in enc.model.parameters())
    out = save_weights(enc, packaged_efficientnet_weights(), tmp_path / "ep" / "weights.pth")
    reloaded = ImageEncoder(weights=out, image_size=32)  # strict: the head is back in the file
    assert reloaded.identity != ImageEncoder(image_size=32).identity
    after = reloaded.encode([Image.fromarray(p) for p in photos[:4]])
    np.testing.assert_allclose(after, enc.encode([Image.fromarray(p) for p in photos[:4]]),
                               rtol=1e-4, atol=1e-5)
    assert (result.best_epoch == 0) == np.allclose(after, before)


def _vectors_of_encoder(tmp_path: Path, name: str, split, periods: bool = True) -> str:
    """An encoder version in the item log of data dir ``tmp_path`` whose text model is a fine-tuned
    encoder with its report, as ``finetune_text`` writes it and the item log records it."""
    from encoders.finetune_report import fine_tuning_of, report_file
    from feature_repo.item_log import ItemLog
    from trainer.finetune import encoder_periods

    folder = tmp_path / "encoders" / name
    folder.mkdir(parents=True)
    report = {"kind": "next-click", **({"periods": encoder_periods(split)} if periods else {})}
    report_file(folder).write_text(json.dumps(report))
    version = f"enc-{name}"
    ItemLog(Config(data_dir=tmp_path).paths.item_log).record_version(
        {"encoder_version": version, "settings": {"text": name},
         "text_fine_tuning": fine_tuning_of(folder)})
    return version


def _split(valid_hours: float, test_hours: float):
    from trainer.train import Split

    return Split([], [], [], _us(T0 + timedelta(hours=valid_hours)),
                 _us(T0 + timedelta(hours=test_hours)))


def test_vectors_of_an_encoder_fine_tuned_on_clicks_a_split_must_not_see_are_refused(tmp_path):
    """The test split's encoder learned from the clicks that choose ``ppm eval
    --validation``'s epochs and chose its own epoch on the period that scores: its vectors
    are refused there, accepted on the test split; the validation split's serve both."""
    from encoders.finetune_report import fine_tuning_of
    from feature_repo.item_log import ItemLog
    from trainer.finetune import LeakyEncoderError, check_vector_periods, encoder_periods

    log = Config(data_dir=tmp_path).paths.item_log
    test_split, validation_split = _split(70, 80), _split(60, 70)
    tested = _vectors_of_encoder(tmp_path, "text-next-click", test_split)
    validated = _vectors_of_encoder(tmp_path, "text-next-click-validation", validation_split)
    assert fine_tuning_of(tmp_path / "encoders" / "text-next-click")["periods"] == \
        encoder_periods(test_split)
    assert fine_tuning_of(tmp_path / "nothing-here") is None and fine_tuning_of(None) is None
    check_vector_periods(log, tested, test_split)
    check_vector_periods(log, validated, test_split)  # learned less; saw nothing later
    check_vector_periods(log, validated, validation_split)
    with pytest.raises(LeakyEncoderError) as refused:
        check_vector_periods(log, tested, validation_split)
    said = " ".join(str(refused.value).split())
    assert said.startswith(f"the vectors {tested} come from a text encoder")
    assert "learned from clicks until 2026-01-03T22:00:00+00:00" in said
    assert "chose its epoch on clicks until 2026-01-04T08:00:00+00:00" in said
    assert "ppm finetune text --validation" in said
    # Only the epoch's choice reads too late: one reason, not two.
    with pytest.raises(LeakyEncoderError) as refused:
        check_vector_periods(log, tested, _split(70, 75))
    reasons = str(refused.value).split(" that ", 1)[1]
    assert "chose its epoch" in reasons and "learned from" not in reasons
    # A model ppm finetune did not write passes; vectors whose making is not recorded, or
    # whose encoder's report predates its periods, are warned about.
    ItemLog(log).record_version({"encoder_version": "enc-minilm", "settings": {},
                                 "text_fine_tuning": None})
    check_vector_periods(log, "enc-minilm", validation_split)
    old = _vectors_of_encoder(tmp_path, "old", test_split, periods=False)
    for version, said in ((old, f"text encoder of the vectors {old} .* does not say which "
                                "periods"),
                          ("enc-unrecorded", "how the vectors enc-unrecorded .* is not recorded")):
        with pytest.warns(UserWarning, match=said):
            check_vector_periods(log, version, validation_split)


def test_ppm_eval_seeds_refuses_leaky_vectors_before_any_fit(tmp_path, monkeypatch):
    """``score_models`` checks the vectors each arm reads (``trainer.encoder_version``
    here) before its first fit."""
    import trainer.experiment
    from trainer.finetune import LeakyEncoderError
    from trainer.train import Split

    fits = []
    monkeypatch.setattr(trainer.experiment, "train_batch", lambda *a, **k: fits.append(a))
    window = object()  # the check comes before any window is read
    monkeypatch.setattr(trainer.experiment, "split_windows", lambda *a, **k: Split(
        [window], [window], [window], *(_us(T0 + timedelta(hours=h)) for h in (60, 70))))
    tested = _vectors_of_encoder(tmp_path, "text-next-click", _split(70, 80))
    cfg = Config(data_dir=tmp_path, trainer={"encoder_version": tested})
    with pytest.raises(LeakyEncoderError, match="--validation"):
        trainer.experiment.score_models(cfg, 1, period="validation")
    assert fits == []


def test_an_encoder_fine_tuned_from_a_fine_tuned_one_keeps_the_later_periods():
    from trainer.finetune import _later, encoder_periods

    own, start = encoder_periods(_split(60, 70)), encoder_periods(_split(70, 80))
    assert _later(own, None) == own
    assert _later(own, {"periods": start}) == start
    assert _later(start, {"periods": own}) == start
    assert _later(own, {"periods": None}) is None
