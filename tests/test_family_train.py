"""Drafter training data and steps for every family (tiny real-class checkpoints, LLaVA-format shards).

Samples go through the data pipeline exactly as ``train.py`` reads them (webdataset shard -> ``SampleEncoder`` with
the family's prompt builder -> ``collate``), so each batch carries the family's own processor outputs
(``VisualInputs``: AnyRes ``image_sizes``, Qwen ``image_grid_thw``, ...) and chat format; the reference for one
sample is the adapter's ``render_conversation`` (itself checked against HF's processors in tests/test_families.py).
"""

from __future__ import annotations

import functools
import io
import json

import pytest
import torch
import webdataset as wds

from specvlm_lit.data.datamodule import ShardDataModule
from specvlm_lit.data.shards import SampleEncoder, collate, sample_images
from specvlm_lit.target import TargetAdapter
from specvlm_lit.targets import VisualInputs, load_prompt_builder
from specvlm_lit.targets.processor import as_chat
from specvlm_lit.training.distill import OnlineDistillation
from tests.families.build import FAMILIES, build_family
from tests.families.reference import image
from tests.helpers import write_shard

RECORDS = [
    (
        [
            {"from": "human", "value": "<image>\nWhat is shown in the image?"},
            {"from": "gpt", "value": "A red square on a blue background."},
        ],
        [(50, 40)],
    ),
    (
        [
            {"from": "human", "value": "<image>\nDescribe the picture."},
            {"from": "gpt", "value": "There are two cats."},
            {"from": "human", "value": "And the colour of the sky?"},
            {"from": "gpt", "value": "It is grey today."},
        ],
        [(40, 90)],
    ),
]


def _png(width: int, height: int, seed: int) -> bytes:
    buf = io.BytesIO()
    image(width, height, seed).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def family_data(tmp_path_factory):
    """family -> (checkpoint dir, shard path); the shard holds RECORDS in this project's LLaVA format."""
    root = tmp_path_factory.mktemp("family_train")
    samples = []
    for k, (conv, sizes) in enumerate(RECORDS):
        members = {"json": json.dumps({"conversations": conv}).encode()}
        members["png"] = _png(*sizes[0], seed=k)
        samples.append((f"s{k:03d}", members))
    shard = write_shard(root / "train-000000.tar", samples)
    return {family: build_family(family, root / family, seed=i) for i, family in enumerate(FAMILIES)}, shard


def _raw(shard):
    return list(wds.WebDataset(str(shard), shardshuffle=False))


def _batch(path, shard):
    encoder = SampleEncoder(load_prompt_builder(path), 512)
    samples = [encoder(raw) for raw in _raw(shard)]
    assert all(s is not None for s in samples), encoder.skipped
    return samples, collate(samples, pad_id=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_samples_are_the_familys_own_conversation_with_its_processor_outputs(family, family_data):
    dirs, shard = family_data
    adapter = TargetAdapter.from_pretrained(dirs[family])
    samples, batch = _batch(dirs[family], shard)
    for (conv, sizes), s, k in zip(RECORDS, samples, range(len(RECORDS))):
        ref = adapter.render_conversation(as_chat(conv), [image(*sizes[0], seed=k)])
        assert torch.equal(s["input_ids"], ref.input_ids[0]) and torch.equal(s["loss_mask"], ref.loss_mask[0])
        # assistant-only loss: every answer turn is learnt, no user / visual token is
        n_answers = sum(m["from"] == "gpt" for m in conv)
        visual = s["input_ids"] == adapter.image_token_id
        assert int(s["loss_mask"].sum()) >= n_answers and not s["loss_mask"][visual].any()
        assert isinstance(s["pixel_values"], VisualInputs)
        for name, value in ref.visual.hf_kwargs().items():
            torch.testing.assert_close(getattr(s["pixel_values"], name), value, atol=0, rtol=0)
        assert [lay.num_tokens for lay in s["layouts"]] == [int(adapter.visual_token_mask(s["input_ids"]).sum())]
    # the batch: one VisualInputs laid out as HF lays out a batch; each sample's share gives its own layouts back
    assert isinstance(batch["pixel_values"], VisualInputs) and batch["image_counts"] == [1, 1]
    for i, s in enumerate(samples):
        assert adapter.layouts_of(sample_images(batch, i)) == s["layouts"]


def _module(path):
    torch.manual_seed(0)
    return OnlineDistillation(str(path), functools.partial(torch.optim.AdamW, lr=3e-3, betas=(0.9, 0.95)))


@pytest.mark.parametrize("family", FAMILIES)
def test_training_steps_on_a_real_format_batch_reduce_the_loss(family, family_data):
    dirs, shard = family_data
    _, batch = _batch(dirs[family], shard)
    module = _module(dirs[family])
    opt = module.configure_optimizers()
    losses = []
    for _ in range(6):
        db = module.draft_batch(batch)
        assert db.valid.any()
        loss, _ = module._losses(db, "train")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.9 * losses[0], losses


def test_datamodule_reads_family_shards_from_the_target_dir(family_data):
    dirs, shard = family_data
    dm = ShardDataModule(str(shard), str(shard), str(dirs["qwen2_5_vl"]), batch_size=1, shuffle_buffer=0, num_workers=0)
    batches = list(dm.val_dataloader())
    assert len(batches) == 2 and all(isinstance(b["pixel_values"], VisualInputs) for b in batches)


@pytest.mark.parametrize("family", ["llava_next", "qwen2_5_vl"])
def test_draft_vocabulary_counts_the_familys_answer_tokens_end_of_turn_included(family, family_data):
    """The pruned draft vocabulary counts what training learns: the answer tokens of the family's own template (the
    image-free count equals the count over the rendered training samples), its end-of-turn token among them."""
    from specvlm_lit.drafter.vocab import answer_token_counts

    dirs, shard = family_data
    prompts = load_prompt_builder(dirs[family])
    vocab = len(prompts.tokenizer) + 8
    counts = answer_token_counts([str(shard)], prompts, vocab)
    samples, _ = _batch(dirs[family], shard)
    learnt = torch.cat([s["input_ids"][s["loss_mask"].bool()] for s in samples])
    assert torch.equal(counts, torch.bincount(learnt, minlength=vocab))
    end_of_turn = prompts.tokenizer.eos_token_id  # <|im_end|> (Qwen), </s> (LLaVA-NeXT Mistral)
    n_answers = sum(m["from"] == "gpt" for conv, _ in RECORDS for m in conv)
    assert int(counts[end_of_turn]) == n_answers
