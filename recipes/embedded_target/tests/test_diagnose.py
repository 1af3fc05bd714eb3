"""The held-out diagnosis: the linear probe tells colour-free shape features from colour-bound ones,
and both probes run on a built target."""

import json
import random

import pytest
import torch

from recipes.embedded_target.diagnose import colour_word_probe, fit_linear_probe, shape_probe
from specvlm_lit.synthetic.scenes import COLOURS, HELD_OUT_PAIRS, SHAPES
from tests.conftest import REPO


def _objects(pairs, shape_signal: float, n: int, seed: int):
    """Features = colour one-hot + shape_signal * shape one-hot + noise, for n objects drawn from pairs."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    colours = sorted(COLOURS)
    drawn = [rng.choice(pairs) for _ in range(n)]
    x = torch.zeros(n, len(colours) + len(SHAPES))
    for i, (c, s) in enumerate(drawn):
        x[i, colours.index(c)] = 1.0
        x[i, len(colours) + SHAPES.index(s)] = shape_signal
    return x + 0.1 * torch.randn(x.shape, generator=gen), torch.tensor([SHAPES.index(s) for _, s in drawn])


@pytest.mark.parametrize("shape_signal, expect_high", [(1.0, True), (0.0, False)])
def test_linear_probe_separates_colour_free_shape_features_from_colour_priors(shape_signal, expect_high):
    seen = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELD_OUT_PAIRS]
    x_train, y_train = _objects(seen, shape_signal, 2000, 0)
    x_test, y_test = _objects(sorted(HELD_OUT_PAIRS), shape_signal, 300, 1)
    predict, train_acc = fit_linear_probe(x_train, y_train, len(SHAPES))
    heldout = (predict(x_test) == y_test).float().mean().item()
    if expect_high:
        assert train_acc > 0.95 and heldout > 0.95
    else:  # colour alone never names a held-out pair's shape: it is exactly the unseen combination
        assert heldout < 0.05


def test_probes_run_on_a_built_target(tiny_target, small_corpus):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(tiny_target).eval()
    processor = AutoProcessor.from_pretrained(tiny_target)
    report = shape_probe(model, processor, train_scenes=32, test_scenes=16)
    held = {f"{c} {s}" for c, s in HELD_OUT_PAIRS}
    for where in ("tower", "projector"):
        r = report[where]
        assert 0 <= r["heldout_accuracy"] <= 1 and set(r["per_pair"]) <= held and r["per_pair"]
        assert all(sum(p["predicted"].values()) == p["n"] for p in r["per_pair"].values())
    urls = sorted(str(p) for p in small_corpus.glob("test-*.tar"))
    probe = colour_word_probe(model, processor, urls, limit=12)
    assert probe["true_word"]["n"] == probe["swapped_word"]["n"] > 0
    assert all(0 <= probe[k]["mean_p"] <= 1 for k in ("seen_pairs", "true_word", "swapped_word"))
    slot = probe["colour_slot"]
    assert slot["held_out"]["n"] == probe["true_word"]["n"] and slot["seen_pairs"]["n"] == probe["seen_pairs"]["n"]
    json.dumps(probe)


@pytest.mark.parametrize("writes", ["the reference", "always brown"])
def test_colour_slot_reports_the_word_written_instead(tiny_target, small_corpus, writes):
    """A stub LM that predicts the reference's next token scores p = 1 at every colour slot; one that
    always writes "brown" scores ~0 and is reported as writing "brown" for every held-out pair."""
    from types import SimpleNamespace

    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(tiny_target).eval()
    processor = AutoProcessor.from_pretrained(tiny_target)
    vocab = model.config.text_config.vocab_size
    brown = processor.tokenizer.encode(" brown", add_special_tokens=False)[0]

    def stub_forward(input_ids, **_):
        ids = input_ids[0]
        target = torch.cat([ids[1:], ids[-1:]]) if writes == "the reference" else torch.full_like(ids, brown)
        return SimpleNamespace(logits=50.0 * torch.nn.functional.one_hot(target, vocab).float()[None])

    model.forward = stub_forward
    urls = sorted(str(p) for p in small_corpus.glob("test-*.tar"))
    slot = colour_word_probe(model, processor, urls, limit=24)["colour_slot"]
    assert slot["held_out"]["n"] > 0 and slot["per_pair"]
    if writes == "the reference":
        assert slot["held_out"]["mean_p"] > 0.99 and slot["seen_pairs"]["mean_p"] > 0.99
        assert all(not p["written_instead"] for p in slot["per_pair"].values())
    else:
        assert slot["held_out"]["mean_p"] < 0.01
        decoded = processor.tokenizer.decode([brown]).strip()
        assert all(p["written_instead"] == {decoded: p["n"]} for p in slot["per_pair"].values())


def test_diagnose_cli_writes_its_report(tiny_target, small_corpus, tmp_path):
    """The Hydra entry point wires both probes to its config and writes diagnosis.json in the run dir."""
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "recipes.embedded_target.diagnose",
            f"target_dir={tiny_target}",
            f"corpus_dir={small_corpus}",
            "shape_probe.train_scenes=32",
            "shape_probe.test_scenes=16",
            "colour_word_probe.limit=12",
            f"hydra.run.dir={run_dir}",
        ],
        check=True,
        capture_output=True,
        cwd=REPO,
    )
    report = json.loads((run_dir / "diagnosis.json").read_text())
    assert report["target_dir"] == str(tiny_target)
    assert set(report["shape_probe"]) == {"tower", "projector"} and report["colour_word_probe"]["true_word"]["n"] > 0
