"""Translation: the WMT16 loader on a small parallel corpus, GNMT, its decoders and sacreBLEU.

The corpus is real text in the real file format: English digit names and their
German translations ("three one four" → "drei eins vier"), one sentence per
line in ``train.en``/``train.de`` etc. It goes through the same loader, BPE
training and batching as WMT16 does. Expected values are computed
independently: sentencepiece called directly, cross entropy written out by
hand, beam search checked against exhaustive enumeration, BLEU by sacreBLEU.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import sacrebleu
import sentencepiece as spm
import torch

from xgrad.data import wmt16
from xgrad.data.base import DatasetMissingError
from xgrad.data.wmt16 import BOS, EOS, PAD, WMT16EnDe
from xgrad.models.gnmt import GNMT, length_penalty
from xgrad.tasks.translation import TranslationTask

ENGLISH = "zero one two three four five six seven eight nine".split()
GERMAN = "null eins zwei drei vier fünf sechs sieben acht neun".split()
VOCAB = 96  # room for every digit word of both languages as one piece


def write_corpus(root: Path, sizes=(("train", 200), ("valid", 20), ("test", 20)), seed: int = 0) -> Path:
    """Line-aligned digit sentences, 2 to 7 words, in the six files of a WMT16 root."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in sizes:
        sentences = [[rng.randrange(10) for _ in range(rng.randint(2, 7))] for _ in range(n)]
        for lang, words in (("en", ENGLISH), ("de", GERMAN)):
            text = "".join(" ".join(words[d] for d in s) + "\n" for s in sentences)
            (root / f"{split}.{lang}").write_text(text, encoding="utf-8")
    return root


def build(root: Path, **overrides) -> WMT16EnDe:
    args = dict(root=str(root), vocab_size=VOCAB, batch_size=16, eval_batch_size=8, max_len=50,
                sort_batches=4, spm_sample_sentences=10_000)
    return WMT16EnDe(**{**args, **overrides})


def tiny_model(seed: int = 0, vocab: int = VOCAB, **kwargs) -> GNMT:
    torch.manual_seed(seed)
    return GNMT(vocab, **{"hidden_size": 32, "encoder_layers": 2, "decoder_layers": 2, "dropout": 0.0,
                          "init_range": 0.5, **kwargs})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run faster on one thread than on several (and leave the other core to the rest)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("wmt16"))


@pytest.fixture(scope="module")
def data(corpus) -> WMT16EnDe:
    return build(corpus)


def lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


# ---------------------------------------------------------------------------- data


def test_tokenizer_is_trained_once_then_reused(tmp_path, monkeypatch):
    root = write_corpus(tmp_path / "wmt16")
    first = build(root)
    model_file = root / f"spm_{VOCAB}.model"
    assert model_file.is_file()
    assert first.tokenizer.get_piece_size() <= VOCAB
    assert [first.tokenizer.id_to_piece(i) for i in (PAD, BOS, EOS)] == ["<pad>", "<s>", "</s>"]
    # every digit word of both languages ended up as one piece: the BPE model really learned the corpus
    assert all(len(first.tokenizer.encode(word)) == 1 for word in ENGLISH + GERMAN)

    def must_not_run(*args, **kwargs):
        raise AssertionError("the cached tokenizer / token ids should have been reused")

    monkeypatch.setattr(spm.SentencePieceTrainer, "train", must_not_run)
    monkeypatch.setattr(wmt16, "encode_file", must_not_run)
    second = build(root)
    assert second.tokenizer.serialized_model_proto() == first.tokenizer.serialized_model_proto()
    for a, b in zip(first.val_batches(), second.val_batches(), strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


def trimmed(batch, side: str) -> list[tuple[int, ...]]:
    """Each row of ``batch[side]`` up to its length, after checking that the rest is padding."""
    rows = []
    for row, n in zip(batch[side].tolist(), [int(n) for n in batch[f"{side}_len"]]):
        assert all(t == PAD for t in row[n:]) and PAD not in row[:n]
        rows.append(tuple(row[:n]))
    return rows


def test_training_batches_hold_every_pair_once_with_bos_eos_and_padding(data, corpus):
    sp = spm.SentencePieceProcessor(model_file=str(corpus / f"spm_{VOCAB}.model"))
    expected = sorted(
        (tuple(sp.encode(en)) + (EOS,), (BOS,) + tuple(sp.encode(de)) + (EOS,))
        for en, de in zip(lines(corpus / "train.en"), lines(corpus / "train.de"), strict=True)
    )
    batches = list(data.train_batches(epoch=0, seed=0))
    assert len(batches) == data.num_train_batches() == math.ceil(200 / 16)
    seen = []
    for batch in batches:
        b = batch["src"].size(0)
        assert 1 <= b <= 16 and batch["tgt"].size(0) == b
        assert batch["src"].size(1) == max(batch["src_len"]) and batch["tgt"].size(1) == batch["tgt_len"].max()
        assert list(batch["src_len"]) == sorted(batch["src_len"], reverse=True)  # longest first: packed unsorted
        seen += zip(trimmed(batch, "src"), trimmed(batch, "tgt"))
    assert sorted(seen) == expected

    again = list(data.train_batches(epoch=0, seed=0))
    assert all(torch.equal(a["src"], b["src"]) for a, b in zip(batches, again, strict=True))
    other_epoch = list(data.train_batches(epoch=1, seed=0))
    assert [b["src"].tolist() for b in other_epoch] != [b["src"].tolist() for b in batches]


@pytest.mark.parametrize("ranks", [2, 3])
def test_ranks_share_every_batch_pair_by_pair(data, corpus, ranks):
    """Rank r takes pairs r, r + ranks, ... of each length-sorted batch: the shares are the one-process batch."""
    whole = list(data.train_batches(epoch=2, seed=1))
    for rank in range(ranks):
        share = build(corpus)
        share.shard(rank, ranks)
        batches = list(share.train_batches(epoch=2, seed=1))
        assert len(batches) == share.num_train_batches() == len(whole)
        for mine, batch in zip(batches, whole, strict=True):
            for side in ("src", "tgt"):
                assert trimmed(mine, side) == trimmed(batch, side)[rank::ranks]


def test_max_len_drops_pairs_too_long_on_either_side(tmp_path):
    root = write_corpus(tmp_path / "wmt16")
    german = root / "train.de"  # every other German sentence said twice: the target side can be the long one
    german.write_text("".join(f"{line} {line}\n" if i % 2 else f"{line}\n" for i, line in enumerate(lines(german))),
                      encoding="utf-8")
    short = build(root, max_len=6)
    sp = short.tokenizer
    lengths = [(len(sp.encode(en)), len(sp.encode(de))) for en, de in zip(lines(root / "train.en"), lines(german))]
    expected = sum(s <= 6 and t <= 6 for s, t in lengths)
    assert 0 < expected < sum(s <= 6 for s, _ in lengths) < 200  # both sides' limits matter here
    batches = list(short.train_batches(epoch=0, seed=3))
    assert sum(b["src"].size(0) for b in batches) == expected
    assert all(max(b["src_len"]) <= 6 + 1 and int(b["tgt_len"].max()) <= 6 + 2 for b in batches)


def test_eval_batches_keep_file_order_and_point_at_raw_references(data, corpus):
    """Batches in file order, each longest first: its index says which sentence each row is."""
    for split, batches in (("valid", data.val_batches()), ("test", data.test_batches())):
        sources, references = lines(corpus / f"{split}.en"), lines(corpus / f"{split}.de")
        start = 0 if split == "valid" else len(lines(corpus / "valid.de"))
        rows = [i for b in batches for i in b["index"]]
        assert sorted(rows) == list(range(start, start + len(references)))
        assert all(sorted(b["index"]) == list(range(min(b["index"]), max(b["index"]) + 1)) for b in batches)
        assert [data.references[i] for i in sorted(rows)] == references
        encoded = dict(zip(rows, (src for b in batches for src in trimmed(b, "src")), strict=True))
        assert [encoded[i] for i in sorted(rows)] == [tuple(data.tokenizer.encode(s)) + (EOS,) for s in sources]
        assert all(list(b["src_len"]) == sorted(b["src_len"], reverse=True) for b in batches)


def test_missing_corpus_names_the_fetch_command(tmp_path):
    root = tmp_path / "nowhere"
    assert "train.en" in wmt16.missing(str(root))
    with pytest.raises(DatasetMissingError, match=f"python scripts/prepare_data.py wmt16_en_de --root {root}"):
        build(root)  # conftest sets HF_DATASETS_OFFLINE=1, so nothing is downloaded


def test_misaligned_files_and_bad_settings_are_refused(tmp_path):
    root = write_corpus(tmp_path / "wmt16")
    (root / "train.de").write_text("eins\n", encoding="utf-8")
    with pytest.raises(ValueError, match="train.en has 200 lines but .*train.de has 1"):
        build(root)
    with pytest.raises(ValueError, match="data.batch_size must be a positive integer, got 0"):
        build(root, batch_size=0)


# ---------------------------------------------------------------------------- model and loss


def test_loss_is_label_smoothed_cross_entropy_over_real_tokens(data):
    model, task = tiny_model(), TranslationTask(data, label_smoothing=0.1)
    batch = next(iter(data.train_batches(epoch=0, seed=0)))
    logits = model(batch["src"], batch["src_len"], batch["tgt"][:, :-1])
    assert logits.shape == (batch["src"].size(0), batch["tgt"].size(1) - 1, VOCAB)

    loss, n = task.train_loss(model, batch)
    n = int(n)  # counted on the batch's device: the engine reads it only with the loss
    assert n == int((batch["tgt_len"] - 1).sum())
    # label smoothing written out: (1 - ε) · NLL + ε · mean over the vocabulary of -log p, per real token
    log_p = torch.log_softmax(logits.detach(), dim=-1)
    total = 0.0
    for i, length in enumerate(batch["tgt_len"].tolist()):
        for t in range(length - 1):
            target = batch["tgt"][i, t + 1]
            total += 0.9 * -log_p[i, t, target] + 0.1 * -log_p[i, t].mean()
    assert loss.item() == pytest.approx(float(total) / n, rel=1e-5)


def test_padding_does_not_change_a_sentence_s_logits(data):
    model = tiny_model().eval()
    batch = data.val_batches()[0]
    assert min(batch["src_len"]) < max(batch["src_len"])  # the batch really has padding
    with torch.no_grad():
        logits = model(batch["src"], batch["src_len"], batch["tgt"][:, :-1])
        for i, (s, t) in enumerate(zip(batch["src_len"], batch["tgt_len"].tolist())):
            alone = model(batch["src"][i:i + 1, :s], batch["src_len"][i:i + 1], batch["tgt"][i:i + 1, :t - 1])
            torch.testing.assert_close(logits[i, :t - 1], alone[0], rtol=1e-5, atol=1e-5)


def test_residual_layers_pass_their_input_through():
    """With a residual layer's LSTM zeroed (its output is then 0), the model equals one without that layer."""
    deep = tiny_model(seed=4, encoder_layers=3, decoder_layers=3).eval()
    shallow = tiny_model(seed=5).eval()
    with torch.no_grad():
        for lstm in (deep.encoder.layers[1], deep.decoder.layers[1]):  # each stack's third layer
            for p in lstm.parameters():
                p.zero_()
    missing, unexpected = shallow.load_state_dict(deep.state_dict(), strict=False)
    assert not missing and all(".layers.1." in key for key in unexpected)
    src, src_len = torch.tensor([[4, 9, 7, EOS], [5, EOS, PAD, PAD]]), torch.tensor([4, 2])
    tgt_in = torch.tensor([[BOS, 6, 8], [BOS, 7, PAD]])
    with torch.no_grad():
        torch.testing.assert_close(deep(src, src_len, tgt_in), shallow(src, src_len, tgt_in))


def test_gnmt8_config_builds_the_4_plus_4_layer_model(compose_config):
    """Parameter count of the composed gnmt8 (built on the meta device) against the layer-by-layer formula."""
    import hydra

    cfg = compose_config("model=gnmt8", "data=wmt16_en_de")
    with torch.device("meta"):
        model = hydra.utils.instantiate(cfg.model.net)
    h, v = 1024, cfg.data.vocab_size

    def lstm(inputs: int, directions: int = 1) -> int:
        return directions * (4 * h * inputs + 4 * h * h + 8 * h)

    expected = (v * h  # one shared embedding
                + lstm(h, 2) + lstm(2 * h) + 2 * lstm(h)  # encoder: bi, uni (2H → H), 2 residual
                + lstm(h) + (2 * h * h + 2 * h + 1)  # decoder attention LSTM and Bahdanau attention
                + 3 * lstm(2 * h)  # decoder LSTMs reading [x, context]
                + h * v + v)  # classifier
    assert sum(p.numel() for p in model.parameters()) == expected
    assert len(model.encoder.layers) + 1 == 4 and len(model.decoder.layers) + 1 == 4


# ---------------------------------------------------------------------------- decoding


def test_greedy_and_beam_search_return_valid_sequences_and_beam_1_is_greedy(data):
    model = tiny_model(seed=1).eval()
    batch = data.val_batches()[0]
    args = dict(bos_id=BOS, eos_id=EOS, max_len=12)
    greedy = model.greedy(batch["src"], batch["src_len"], **args)
    beam1, _ = model.beam_search(batch["src"], batch["src_len"], **args, beam_size=1, alpha=0.6)
    beam4, scores = model.beam_search(batch["src"], batch["src_len"], **args, beam_size=4, alpha=0.6)
    assert beam1 == greedy
    assert scores.shape == (len(beam4),) and torch.isfinite(scores).all()
    for hypotheses in (greedy, beam4):
        assert len(hypotheses) == batch["src"].size(0)
        assert any(hypotheses)  # not all empty
        for ids in hypotheses:
            assert len(ids) <= 12 and all(0 <= t < VOCAB and t not in (PAD, BOS, EOS) for t in ids)
    # each returned score is the hypothesis' own log P / lp, re-scored by one teacher-forced pass
    for i, ids in enumerate(beam4):
        y = ids + [EOS] if len(ids) < 12 else ids  # shorter than max_len: it ended with EOS
        with torch.no_grad():
            logits = model(batch["src"][i:i + 1], batch["src_len"][i:i + 1], torch.tensor([[BOS] + y[:-1]]))
        log_p = torch.log_softmax(logits[0], dim=-1)[torch.arange(len(y)), y].sum()
        assert scores[i].item() == pytest.approx(float(log_p / length_penalty(torch.tensor(float(len(y))), 0.6)),
                                                 abs=1e-4)


def test_beam_search_with_a_wide_beam_finds_the_best_normalised_hypothesis():
    """Vocabulary {pad, unk, bos, eos, a, b}, 3 steps: a beam wider than every candidate is exhaustive."""
    vocab, max_len = 6, 3
    model = tiny_model(seed=3, vocab=vocab, init_range=1.0).eval()  # peaked, source-dependent distributions
    src = torch.tensor([[4, 5, 4, EOS], [5, EOS, PAD, PAD], [4, 4, 5, EOS]])
    src_len = torch.tensor([4, 2, 4])
    tokens = [1, 4, 5]  # unk, a, b (pad and BOS are never emitted)
    candidates = [list(y) + [EOS] for n in range(max_len) for y in itertools.product(tokens, repeat=n)]
    candidates += [list(y) for y in itertools.product(tokens, repeat=max_len)]  # cut at max_len, no EOS
    # log P(y | x) of every candidate by teacher forcing: one padded forward pass per sentence
    tgt_in = torch.tensor([([BOS] + y[:-1] + [PAD] * max_len)[:max_len] for y in candidates])
    targets = torch.tensor([(y + [PAD] * max_len)[:max_len] for y in candidates])
    lengths = torch.tensor([float(len(y)) for y in candidates])
    with torch.no_grad():
        log_p = []
        for i in range(src.size(0)):
            n = len(candidates)
            logits = model(src[i:i + 1].expand(n, -1), src_len[i:i + 1].expand(n), tgt_in)
            per_token = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            log_p.append(per_token.masked_fill(targets == PAD, 0.0).sum(dim=1))
    winners = {}
    for alpha in (0.0, 1.0):
        found, score = model.beam_search(src, src_len, BOS, EOS, max_len, beam_size=64, alpha=alpha)
        for i in range(src.size(0)):
            normalised = log_p[i] / length_penalty(lengths, alpha)
            best = candidates[int(normalised.argmax())]
            assert found[i] == [t for t in best if t != EOS]
            assert score[i].item() == pytest.approx(normalised.max().item(), abs=1e-4)
            winners[alpha, i] = best
    # the check has teeth: length normalisation changes a winner, and the source changes what wins
    assert any(winners[0.0, i] != winners[1.0, i] for i in range(src.size(0)))
    assert len({tuple(winners[1.0, i]) for i in range(src.size(0))}) > 1


# ---------------------------------------------------------------------------- BLEU and evaluation


def test_bleu_is_sacrebleu_on_raw_text(data, corpus):
    task = TranslationTask(data)
    references = lines(corpus / "valid.de")
    assert task.bleu(references, references) == pytest.approx(100.0)
    assert sacrebleu.corpus_bleu(references, [references]).score == pytest.approx(100.0)
    shuffled = references[1:] + references[:1]
    assert task.bleu(shuffled, references) == pytest.approx(sacrebleu.corpus_bleu(shuffled, [references]).score)
    assert task.bleu(shuffled, references) < 50


@pytest.fixture(scope="module")
def trained(data) -> GNMT:
    """tiny_model(seed=0) after 300 Adam steps on the 200 training pairs (about 16 epochs)."""
    model = tiny_model(seed=0).train()
    task = TranslationTask(data)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for batch in itertools.islice((b for epoch in range(100) for b in data.train_batches(epoch, seed=0)), 300):
        loss, _ = task.train_loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_a_trained_tiny_gnmt_translates_digit_names(data, trained):
    """Untrained, BLEU is about 0; trained, BLEU is far above it (greedy and beam search)."""
    with torch.no_grad():
        before = TranslationTask(data, decoding="greedy", max_decode_len=20).evaluate(tiny_model(seed=0).eval(),
                                                                                     data.val_batches())
        greedy = TranslationTask(data, decoding="greedy", max_decode_len=20).evaluate(trained, data.val_batches())
        beam = TranslationTask(data, decoding="beam", beam_size=3, max_decode_len=20).evaluate(trained,
                                                                                              data.val_batches())
    assert before["bleu"] < 10
    assert greedy["bleu"] > 50 and beam["bleu"] > 50
    assert greedy["loss"] == beam["loss"] < before["loss"] / 2


def test_evaluate_scores_detokenised_translations_against_references(data, corpus, trained):
    task = TranslationTask(data, decoding="greedy", max_decode_len=12, max_eval_sentences=10)
    batches = data.val_batches()  # 20 sentences in batches of 8: 10 sentences means two whole batches
    with torch.no_grad():
        metrics = task.evaluate(trained, batches)
        hypotheses = [data.tokenizer.decode(ids) for b in batches[:2]
                      for ids in trained.greedy(b["src"], b["src_len"], BOS, EOS, max_len=12)]
        nll, n = 0.0, 0
        for b in batches:
            log_p = torch.log_softmax(trained(b["src"], b["src_len"], b["tgt"][:, :-1]), dim=-1)
            target = b["tgt"][:, 1:]
            real = target != PAD
            nll -= log_p.gather(-1, target.unsqueeze(-1)).squeeze(-1)[real].sum().item()
            n += int(real.sum())
    lines_of_file = lines(corpus / "valid.de")
    references = [lines_of_file[i] for b in batches[:2] for i in b["index"]]  # each batch holds its rows longest first
    assert sorted(references) == sorted(lines_of_file[:16])
    assert metrics["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hypotheses, [references]).score)
    assert 0 < metrics["bleu"] < 100  # a score that wrong alignment or a wrong subset would change
    assert metrics["loss"] == pytest.approx(nll / n, rel=1e-5)


def test_bad_decoding_settings_are_refused(data):
    with pytest.raises(ValueError, match="decoding must be one of greedy, beam, got 'sample'"):
        TranslationTask(data, decoding="sample")
    with pytest.raises(ValueError, match="beam_size must be a positive integer, got 0"):
        TranslationTask(data, beam_size=0)
    with pytest.raises(ValueError, match="encoder_layers must be an integer >= 2, got 1"):
        GNMT(VOCAB, hidden_size=8, encoder_layers=1)


# ---------------------------------------------------------------------------- through the engine


def test_engine_trains_gnmt_tiny_with_xgrad_and_reports_bleu(request, tmp_path):
    pytest.importorskip("xgrad.train", reason="the engine (xgrad/train.py) is not in this checkout yet")
    train_run = request.getfixturevalue("train_run")
    root = write_corpus(tmp_path / "wmt16")
    run_dir = train_run("model=gnmt_tiny", "data=wmt16_en_de", f"data.root={root}", f"data.vocab_size={VOCAB}",
                        "data.batch_size=8", "data.eval_batch_size=8", "xgrad=on")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert 0 <= metrics[-1]["val/bleu"] <= 100 and np.isfinite(metrics[-1]["val/loss"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert 0 <= summary["test/bleu"] <= 100


def test_lengths_in_any_order_or_as_a_tensor_give_the_same_logits(data):
    """The data module gives lengths longest first on the host; a user's batch may give them otherwise."""
    model = tiny_model().eval()
    batch = data.val_batches()[0]
    flip = torch.arange(batch["src"].size(0) - 1, -1, -1)
    with torch.no_grad():
        logits = model(batch["src"], batch["src_len"], batch["tgt"][:, :-1])
        flipped = model(batch["src"][flip], torch.tensor(batch["src_len"])[flip], batch["tgt"][flip, :-1])
    torch.testing.assert_close(flipped[flip], logits, rtol=1e-5, atol=1e-5)
