"""Reliability probes of the data pipeline (issue 19): it never deletes user files, never hangs, never dies on one
bad sample, and shows what it skipped. Each test is one probe a user ran; all use tiny data and hard timeouts."""

import contextlib
import io
import json
import logging
import re
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image

import train as train_script
from recipes.embedded_target.tokenizer import build_processor
from specvlm_lit.data.datamodule import DataConfigError, ShardDataModule
from specvlm_lit.data.skips import NoUsableSamples, TooManyBadSamples
from specvlm_lit.data.sources import ShardPathError
from specvlm_lit.errors import UserError
from specvlm_lit.utils.atomic import ForeignDirectoryError
from tests.helpers import write_shard
from tests.test_train import train_cfg

REPO = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def raises_user_error(kind: type[UserError], match: str):
    """Like ``pytest.raises(kind)``, also when Hydra's ``instantiate`` wrapped it (the CLI probes check the output)."""
    with pytest.raises(Exception) as info:
        yield info
    error = info.value if isinstance(info.value, kind) else info.value.__cause__
    assert isinstance(error, kind), repr(info.value)
    assert re.search(match, str(error)), str(error)


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging the suite) if the body runs longer than ``seconds``."""

    def expired(*_):
        raise TimeoutError(f"still running after {seconds}s: the data pipeline hangs")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def good(small_corpus):
    """Four good samples (png + json bytes) of the small corpus."""
    return list(wds.WebDataset(str(small_corpus / "val-000000.tar"), shardshuffle=False))[:4]


@pytest.fixture(scope="module")
def processor(corpus_tokenizer):
    return build_processor(corpus_tokenizer, patch_size=8)


def png(size: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), "red").save(buf, format="PNG")
    return buf.getvalue()


def good_samples(good, keys=None) -> list:
    return [(k or g["__key__"], {"png": g["png"], "json": g["json"]}) for k, g in zip(keys or [None] * len(good), good)]


def bad_json_samples(good, n: int) -> list:
    return [(f"s{i}", {"png": good[0]["png"], "json": b"{"}) for i in range(n)]


def conv_json(conversations) -> bytes:
    return json.dumps({"conversations": conversations}).encode()


def malformed(good) -> list[tuple[str, dict[str, bytes], str]]:
    """(key, members, reason): every malformed sample shape a probe found, with the reason it must be counted as."""
    img, rec = good[0]["png"], good[0]["json"]
    return [
        ("null-conv", {"png": img, "json": conv_json(None)}, "bad_conversation"),
        ("str-conv", {"png": img, "json": conv_json("<image>\nWhat is it? A circle.")}, "bad_conversation"),
        ("strlist-conv", {"png": img, "json": conv_json(["<image>\nWhat?", "A circle."])}, "bad_conversation"),
        (
            "role-list",
            {"png": img, "json": conv_json([{"from": ["human"], "value": "<image>\nHi"}])},
            "bad_conversation",
        ),
        ("no-conv", {"png": img, "json": b'{"id": 3}'}, "bad_conversation"),
        ("record-list", {"png": img, "json": b"[1, 2]"}, "bad_json"),
        ("bad-utf8", {"png": img, "json": b'{"conversations": "\xff\xfe"}'}, "bad_json"),
        ("tiny-img", {"png": png(4), "json": rec}, "image_too_small"),
        ("no-json", {"png": img}, "missing_json"),
        ("no-img", {"json": rec}, "missing_image"),
        ("bad-img", {"png": b"not a png", "json": rec}, "corrupt_image"),
        ("no-answer", {"png": img, "json": conv_json([{"from": "human", "value": "<image>\nHi?"}])}, "no_answer"),
    ]


# ------------------------------------------------------------------------------------- 1: no deleted user files
def test_synthetic_cli_refuses_a_user_directory_in_one_line(tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    out = subprocess.run(
        [sys.executable, "-m", "specvlm_lit.synthetic", "--out", str(user), "--n-train", "2", "--n-val", "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0
    assert out.stderr.strip().count("\n") == 0 and out.stderr.startswith("error: "), out.stderr
    assert "not written by specvlm-lit" in out.stderr
    assert (
        sorted(p.name for p in user.iterdir()) == ["thesis.tex"]
        and (user / "thesis.tex").read_text() == "years of work"
    )


def test_train_refuses_a_user_corpus_dir_before_any_model_loads(tmp_path, monkeypatch):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "photos.tar").write_bytes(b"precious")
    cfg = train_cfg(tmp_path / "no-target", user, tmp_path / "out", "data.generate_if_missing=true")
    cfg.data.train_urls = f"{user}/train-{{000000..000011}}.tar"  # the synthetic config's own pattern
    cfg.data.val_urls = f"{user}/val-000000.tar"
    with raises_user_error(ForeignDirectoryError, "refusing to replace"):
        train_script.run(cfg)  # target.path does not even exist: nothing got as far as loading it
    assert [p.name for p in user.iterdir()] == ["photos.tar"] and (user / "photos.tar").read_bytes() == b"precious"


def test_train_cli_refuses_a_user_corpus_dir_in_one_line(tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "photos.tar").write_bytes(b"precious")
    out = subprocess.run(
        [
            sys.executable,
            "train.py",
            f"data.corpus_dir={user}",
            f"paths.output_dir={tmp_path / 'out'}",
            f"hydra.run.dir={tmp_path / 'hydra'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 1, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith("error: "), out.stderr[-2000:]
    assert "refusing to replace" in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert [p.name for p in user.iterdir()] == ["photos.tar"] and (user / "photos.tar").read_bytes() == b"precious"


# ------------------------------------------------------------------------------------- 2: start-up shard checks
@pytest.mark.parametrize(
    "urls, message",
    [
        ("{root}/train-{000000..000011}.tar", "12 of 12 shard.s. do not exist.*empty"),  # empty directory
        ("{root}/nowhere/train-000000.tar", "nowhere does not exist"),
        ("{root}/train-{000000..00001.tar", "unbalanced braces"),
        ("$DATA/train-000000.tar", "unexpanded '\\$' variable"),
        ("{root}/*.tar", "do not exist"),  # a glob matching nothing
        ("{root}", "names the directory"),
        ("", "is empty"),
    ],
)
def test_bad_shard_paths_fail_at_startup_naming_the_field(tmp_path, processor, urls, message):
    root = tmp_path / "empty"
    root.mkdir()
    with deadline(30), pytest.raises(ShardPathError, match=message) as e:
        ShardDataModule(urls.replace("{root}", str(root)), str(root / "val.tar"), processor, num_workers=0)
    assert "data.train_urls" in str(e.value)


def test_missing_validation_shard_is_named_and_nearby_shards_listed(tmp_path, small_corpus, processor):
    with pytest.raises(ShardPathError, match=r"data.val_urls.*holds 5 .tar file\(s\): test-000000.tar"):
        ShardDataModule(str(small_corpus / "train-000000.tar"), str(small_corpus / "val-00000.tar"), processor)


def test_globs_and_braces_expand_to_existing_shards(small_corpus, processor):
    dm = ShardDataModule(
        str(small_corpus / "train-*.tar"), f"{small_corpus}/val-{{000000..000000}}.tar", processor, num_workers=0
    )
    assert dm._train_shards == [str(small_corpus / f"train-00000{i}.tar") for i in range(3)]


def test_train_with_an_empty_corpus_dir_fails_at_startup(tiny_target, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with raises_user_error(ShardPathError, "data.train_urls.*do not exist.*is empty"):
        train_script.run(train_cfg(tiny_target, empty, tmp_path / "out"))


# ------------------------------------------------------------------------------------- 3: bad samples never fatal
def test_every_malformed_sample_shape_is_skipped_and_counted_by_reason(tmp_path, good, processor):
    cases = malformed(good)
    shard = write_shard(
        tmp_path / "mixed-000000.tar",
        good_samples(good) + [(k, m) for k, m, _ in cases],
    )
    dm = ShardDataModule(str(shard), str(shard), processor, batch_size=2, num_workers=0, max_bad_fraction=1.0)
    with deadline(60):
        batches = list(dm.val_dataloader())
    assert sum(len(b["keys"]) for b in batches) == len(good)
    expected = {}
    for _, _, reason in cases:
        expected[reason] = expected.get(reason, 0) + 1
    counts = dm.val_bad_samples.counts
    assert {k: counts[k] for k in expected} == expected
    assert counts["seen"] == len(good) + len(cases)


def test_malformed_samples_are_skipped_in_training_too(tmp_path, good, processor):
    cases = malformed(good)
    shard = write_shard(
        tmp_path / "mixed-000000.tar",
        [(k, m) for k, m, _ in cases] + good_samples(good),
    )
    dm = ShardDataModule(
        str(shard), str(shard), processor, batch_size=1, num_workers=0, shuffle_buffer=0, samples_per_epoch=4
    )
    dm.bad_samples.max_bad_fraction = 1.0  # count, do not judge: this probe is about never crashing
    with deadline(60):
        batches = list(dm.train_dataloader())
    assert len(batches) == 4
    assert dm.bad_samples.counts["bad_conversation"] >= 5 and dm.bad_samples.counts["image_too_small"] >= 1


# ------------------------------------------------------------------------------------- 2/7: no silent hang
@pytest.mark.parametrize("samples_per_epoch", [16, None], ids=["epochs", "endless"])
def test_an_all_corrupt_training_shard_stops_instead_of_hanging(tmp_path, good, processor, samples_per_epoch):
    shard = write_shard(
        tmp_path / "bad-000000.tar", [(f"s{i}", {"png": good[0]["png"], "json": b"{"}) for i in range(5)]
    )
    dm = ShardDataModule(
        str(shard), str(shard), processor, batch_size=2, num_workers=0, samples_per_epoch=samples_per_epoch
    )
    with deadline(60), pytest.raises(NoUsableSamples, match="no usable train sample.*bad_json=") as e:
        next(iter(dm.train_dataloader()))  # an endless stream of 5 corrupt samples: no batch can ever form
    assert "data.train_urls" in str(e.value)


def test_shards_without_samples_stop_an_endless_stream(tmp_path, processor):
    shard = write_shard(tmp_path / "empty-000000.tar", [])
    dm = ShardDataModule(str(shard), str(shard), processor, batch_size=2, num_workers=0)
    with deadline(60), pytest.raises(NoUsableSamples, match="empty_shard="):
        next(iter(dm.train_dataloader()))


def test_max_bad_fraction_is_enforced_from_the_first_samples(tmp_path, good, processor):
    # 1 in 4 bad, limit 5%: judged once bad_fraction_min_samples (here 20) samples are read, not after 200.
    samples = []
    for i in range(60):
        g = good[i % 4]
        samples.append((f"s{i:03d}", {"png": g["png"], "json": b"{" if i % 4 == 3 else g["json"]}))
    shard = write_shard(tmp_path / "quarter-000000.tar", samples)
    dm = ShardDataModule(
        str(shard), str(shard), processor, batch_size=2, num_workers=0, shuffle_buffer=0, bad_fraction_min_samples=20
    )
    with deadline(60), pytest.raises(TooManyBadSamples, match="max_bad_fraction=0.05"):
        for _ in dm.train_dataloader():
            pass
    assert 20 <= dm.bad_samples.counts["seen"] <= 40


def test_a_truncated_tar_member_counts_as_corrupt_tar(tmp_path, good, processor):
    # png before json, as many real shards are: the cut lands in sample 2's json.
    shard = write_shard(
        tmp_path / "full-000000.tar", [(f"s{i}", {"png": g["png"], "json": g["json"]}) for i, g in enumerate(good)]
    )
    with tarfile.open(shard) as tf:
        member = tf.getmember("s2.json")
    cut = tmp_path / "cut-000000.tar"
    cut.write_bytes(shard.read_bytes()[: member.offset_data + member.size // 2])
    dm = ShardDataModule(str(cut), str(cut), processor, batch_size=1, num_workers=0, max_bad_fraction=1.0)
    batches = list(dm.val_dataloader())
    counts = dm.val_bad_samples.counts
    assert len(batches) == 2 and counts["corrupt_tar"] == 1
    assert not counts["bad_json"] and not counts["missing_json"] and not counts["missing_image"]


# ------------------------------------------------------------------------------------- 9: value checks, workers
@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"batch_size": 0}, "data.batch_size"),
        ({"num_workers": -1}, "data.num_workers"),
        ({"samples_per_epoch": 1, "batch_size": 4}, "data.samples_per_epoch"),
        ({"max_bad_fraction": 1.5}, "data.max_bad_fraction"),
    ],
)
def test_out_of_range_data_values_are_one_line_errors(small_corpus, processor, kwargs, field):
    with pytest.raises(UserError, match=field):
        ShardDataModule(
            str(small_corpus / "train-000000.tar"), str(small_corpus / "val-000000.tar"), processor, **kwargs
        )


def test_batch_size_zero_fails_in_train_run(tiny_target, small_corpus, tmp_path):
    with raises_user_error(DataConfigError, "data.batch_size must be an integer >= 1, got 0"):
        train_script.run(train_cfg(tiny_target, small_corpus, tmp_path, "data.batch_size=0"))


def test_one_shard_uses_fewer_loader_workers_with_a_warning(small_corpus, processor, caplog):
    dm = ShardDataModule(
        str(small_corpus / "train-000000.tar"),
        str(small_corpus / "val-000000.tar"),
        processor,
        batch_size=2,
        num_workers=4,
        shuffle_buffer=0,
        samples_per_epoch=8,
    )
    with deadline(120), caplog.at_level(logging.WARNING):
        loader = dm.train_dataloader()
        batches = list(loader)
    assert loader.num_workers == 1 and len(batches) == 4
    assert "data.num_workers=4" in caplog.text and "using 1 loader worker" in caplog.text


# ------------------------------------------------------------------------------------- 7: skips made visible
def test_skips_are_printed_counted_for_validation_and_kept_in_checkpoints(
    tiny_target, small_corpus, good, tmp_path, capsys
):
    # Training: 3 intact shards plus one with 2 bad samples; validation: the val shard plus 2 bad samples.
    bad = [(f"bad{i}", {"png": good[0]["png"], "json": conv_json(None)}) for i in range(2)]
    extra = write_shard(tmp_path / "extra-000000.tar", good_samples(good) + bad)
    cfg = train_cfg(
        tiny_target,
        small_corpus,
        tmp_path / "out",
        "compressor=none",
        "data.max_bad_fraction=0.5",
        "trainer.limit_val_batches=null",
    )
    cfg.data.train_urls = [f"{small_corpus}/train-{{000000..000002}}.tar", str(extra)]
    cfg.data.val_urls = [str(small_corpus / "val-000000.tar"), str(extra)]
    train_script.run(cfg)
    out = capsys.readouterr().out
    assert "data: epoch 0 val: 2 of 22 read unusable: bad_conversation=2" in out
    assert "data: epoch 0 train: " in out and "data, whole run: train " in out
    state = torch.load(tmp_path / "out" / "checkpoints" / "last.ckpt", weights_only=False)["ShardDataModule"]
    assert state["skips"]["val"]["seen"] == 22 and state["skips"]["val"]["bad_conversation"] == 2
    assert state["skips"]["train"]["seen"] >= 16
    dm = ShardDataModule(str(extra), str(extra), build_processor_of(tiny_target), num_workers=0)
    dm.load_state_dict(state)  # a resumed run starts from these counts
    assert dm.val_bad_samples.counts["bad_conversation"] == 2
    assert dm.bad_samples.counts["seen"] == state["skips"]["train"]["seen"]


def build_processor_of(target_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(target_dir)


def test_an_all_corrupt_validation_shard_is_an_error(tiny_target, small_corpus, good, tmp_path):
    shard = write_shard(
        tmp_path / "val-000000.tar", [(f"v{i}", {"png": good[0]["png"], "json": b"{"}) for i in range(4)]
    )
    cfg = train_cfg(tiny_target, small_corpus, tmp_path / "out", "compressor=none")
    cfg.data.val_urls = str(shard)
    with deadline(300), pytest.raises(NoUsableSamples, match="no usable val sample.*bad_json=4"):
        train_script.run(cfg)


def test_too_many_bad_samples_is_one_line_from_the_cli(tiny_target, small_corpus, good, tmp_path):
    shard = write_shard(
        tmp_path / "bad-000000.tar", [(f"s{i}", {"png": good[0]["png"], "json": b"{"}) for i in range(8)]
    )
    out = subprocess.run(
        [
            sys.executable,
            "train.py",
            "debug=tiny",
            "compressor=none",
            f"target.path={tiny_target}",
            f"data.corpus_dir={small_corpus}",
            f"data.train_urls={shard}",
            f"data.val_urls={small_corpus}/val-000000.tar",
            f"paths.output_dir={tmp_path / 'out'}",
            "trainer.num_sanity_val_steps=0",
            f"hydra.run.dir={tmp_path / 'hydra'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 1, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no usable train sample") and "bad_json=" in last
    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout


def _epoch_keys(dm, epoch: int, rank: int, world: int, monkeypatch) -> list[list[str]]:
    """The keys of every batch one rank's training loader yields in ``epoch`` (``world`` ranks, set through the
    RANK / WORLD_SIZE variables webdataset's split_by_node reads, as torchrun sets them)."""
    from types import SimpleNamespace

    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    dm.trainer = SimpleNamespace(current_epoch=epoch, world_size=world, sanity_checking=False, training=True)
    try:
        return [batch["keys"] for batch in dm.train_dataloader()]
    finally:
        dm.trainer = None


def test_pipe_urls_and_brace_patterns_split_disjointly_over_ranks_and_workers_and_resume_exactly(
    tmp_path, small_corpus, processor, monkeypatch
):
    """`pipe:` commands (how object stores are read: `pipe:aws s3 cp s3://... -`) and brace patterns give the same
    stream as local paths; ranks and loader workers read disjoint shards; a resumed epoch skips exactly the batches
    its checkpoint consumed."""
    samples = [
        (s["__key__"], {"png": s["png"], "json": s["json"]})
        for shard in sorted(small_corpus.glob("train-*.tar"))
        for s in wds.WebDataset(str(shard), shardshuffle=False)
    ][:96]
    for i in range(8):  # 8 shards of 12: 2 ranks x 2 workers get 2 shards each
        write_shard(tmp_path / f"train-{i:06d}.tar", samples[i * 12 : (i + 1) * 12])
    local = f"{tmp_path}/train-{{000000..000007}}.tar"
    piped = f"pipe:cat {tmp_path}/train-{{000000..000007}}.tar"
    kwargs = dict(batch_size=2, num_workers=2, samples_per_epoch=32, shuffle_buffer=4, seed=3)
    with deadline(240):
        by_url = {}
        for name, urls in (("local", local), ("pipe", piped)):
            dm = ShardDataModule(urls, str(small_corpus / "val-000000.tar"), processor, **kwargs)
            assert len(dm._train_shards) == 8
            by_url[name] = [_epoch_keys(dm, 1, rank, 2, monkeypatch) for rank in (0, 1)]
        assert by_url["pipe"] == by_url["local"]  # the same batches, whatever opens the shards
        rank0, rank1 = ({k for b in batches for k in b} for batches in by_url["pipe"])
        assert rank0 and rank1 and not rank0 & rank1  # disjoint ranks
        assert len(by_url["pipe"][0]) == len(by_url["pipe"][1]) == 8  # every rank the same number of steps
        shard_of = {key: i // 12 for i, (key, _) in enumerate(samples)}
        for batches in by_url["pipe"]:  # the two workers of a rank alternate batches and read disjoint shards
            worker_shards = [{shard_of[k] for b in batches[w::2] for k in b} for w in (0, 1)]
            assert not worker_shards[0] & worker_shards[1]
        dm = ShardDataModule(piped, str(small_corpus / "val-000000.tar"), processor, **kwargs)
        dm.load_state_dict({"epoch": 1, "batches_done": 4})  # a checkpoint taken after 4 steps of epoch 1
        assert _epoch_keys(dm, 1, 0, 2, monkeypatch) == by_url["pipe"][0][4:]
