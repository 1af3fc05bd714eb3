"""train.py end to end on a tiny target: smoke run, export, strict configs, resume, real 2-process DDP."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

import train as train_script
from specvlm_lit.drafter.eagle import DrafterMismatchError, EagleVLMDrafter
from specvlm_lit.target import TargetAdapter

REPO = Path(__file__).resolve().parents[1]


def train_cfg(tiny_target, small_corpus, out, *overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            config_name="train",
            return_hydra_config=False,
            overrides=[
                "debug=tiny",
                f"target.path={tiny_target}",
                f"data.corpus_dir={small_corpus}",
                f"data.train_urls='{small_corpus}/train-{{000000..000002}}.tar'",
                f"data.val_urls={small_corpus}/val-000000.tar",
                f"paths.output_dir={out}",
                f"paths.root_dir={REPO}",
                *overrides,
            ],
        )
    return cfg


@pytest.mark.parametrize("compressor", ["none", "select", "resampler"])
def test_one_epoch_trains_and_exports_a_loadable_drafter(tiny_target, small_corpus, tmp_path, compressor):
    cfg = train_cfg(tiny_target, small_corpus, tmp_path, f"compressor={compressor}")
    result = train_script.run(cfg)
    assert result["global_step"] == 4  # 16 samples / batch 4
    assert "val/top1_step1" in result["metrics"] and "val/loss" in result["metrics"]
    assert result["metrics"]["val/sigma"] >= 1.0  # real tree decoding of validation prompts
    target = TargetAdapter.from_pretrained(tiny_target)
    drafter = EagleVLMDrafter.load(result["export_dir"], target=target)
    assert (drafter.compressor is None) == (compressor == "none")
    gate = {k: float(v) for k, v in result["metrics"].items() if k.startswith("val/gate/")}
    if compressor == "select":  # inference-time branch histogram over the validation batches
        assert len(gate) == len(drafter.compressor.branches) and sum(gate.values()) == pytest.approx(1.0)
    else:
        assert not gate
    assert drafter.config.target_fingerprint == target.fingerprint()
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert list((tmp_path / "csv").rglob("metrics.csv"))


@pytest.mark.parametrize("compressor,vocab", [pytest.param("none", None, marks=pytest.mark.slow), ("select", 40)])
def test_eagle3_trains_exports_and_decodes_losslessly(tiny_target, small_corpus, tmp_path, compressor, vocab):
    """drafter=eagle3 (training-time test, optional pruned vocabulary) trains, exports an eagle3_vlm directory that
    load_drafter dispatches on, and decoding with it is token-identical to the target's greedy generate()."""
    from specvlm_lit.decoding.acceptance import WarpConfig
    from specvlm_lit.decoding.speculative import SpeculativeDecoder, TreeConfig
    from specvlm_lit.drafter.base import load_drafter
    from specvlm_lit.drafter.eagle3 import Eagle3VLMDrafter

    extra = [f"drafter.draft_vocab_size={vocab}"] if vocab else []
    cfg = train_cfg(tiny_target, small_corpus, tmp_path, "drafter=eagle3", f"compressor={compressor}", *extra)
    result = train_script.run(cfg)
    assert result["global_step"] == 4 and "val/top1_step5" in result["metrics"]
    assert result["metrics"]["val/sigma"] >= 1.0
    target = TargetAdapter.from_pretrained(tiny_target)
    drafter = load_drafter(result["export_dir"], target=target)
    assert isinstance(drafter, Eagle3VLMDrafter) and (drafter.compressor is None) == (compressor == "none")
    if vocab:  # the most frequent answer tokens of the training shards, stored with the weights
        assert drafter.draft_vocab.numel() == vocab and bool((drafter.draft_vocab.diff() > 0).all())
    ids = torch.randint(4, target.vocab_size, (1, 8))
    ids[ids == target.image_token_id] = 5
    with torch.no_grad():
        res = SpeculativeDecoder(target, drafter, TreeConfig(4, 4, 12), WarpConfig()).generate(ids, max_new_tokens=12)
        ref = target.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, pad_token_id=0
        )
    n = res.tokens.numel()
    assert res.tokens.tolist() == ref[0, ids.shape[1] : ids.shape[1] + n].tolist() and n >= 1


def test_drafter_config_errors(tiny_target, small_corpus, tmp_path):
    from specvlm_lit.training.distill import drafter_settings

    with pytest.raises(Exception, match="known types: eagle3_vlm, eagle_vlm"):
        drafter_settings({"model_type": "medusa"})
    with pytest.raises(Exception, match="lambda_feat must be 0"):
        drafter_settings({"model_type": "eagle3_vlm", "lambda_feat": 1.0})
    with pytest.raises(Exception, match="unknown key"):
        drafter_settings({"model_type": "eagle_vlm", "draft_vocab_size": 10})


def test_resume_continues_from_the_checkpoint(tiny_target, small_corpus, tmp_path):
    first = train_script.run(train_cfg(tiny_target, small_corpus, tmp_path / "a", "compressor=none"))
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=False)
    assert state["epoch"] == 0 and state["global_step"] == first["global_step"]
    second = train_script.run(
        train_cfg(
            tiny_target, small_corpus, tmp_path / "b", "compressor=none", "trainer.max_epochs=2", f"+ckpt_path={ckpt}"
        )
    )
    assert second["global_step"] == 2 * first["global_step"]


def test_export_holds_the_monitored_best_checkpoint(tiny_target, small_corpus, tmp_path):
    # Two epochs; the export must be the checkpoint ModelCheckpoint kept as best by its monitor, not the last weights.
    result = train_script.run(
        train_cfg(
            tiny_target,
            small_corpus,
            tmp_path,
            "compressor=none",
            "trainer.max_epochs=2",
            "callbacks.model_checkpoint.mode=min",
        )
    )  # min: the first epoch can be the best
    src = result["exported_from"]
    assert src["monitor"] == "val/top1_step1" and Path(src["checkpoint"]).is_file()
    best = torch.load(src["checkpoint"], weights_only=False)["state_dict"]
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    exported = EagleVLMDrafter.load(
        result["export_dir"], target=TargetAdapter.from_pretrained(tiny_target)
    ).state_dict()
    for k, v in exported.items():
        assert torch.equal(v, best[f"drafter.{k}"]), k
    if Path(src["checkpoint"]).name != "last.ckpt" and any(not torch.equal(best[k], last[k]) for k in best):
        assert any(not torch.equal(exported[k], last[f"drafter.{k}"]) for k in exported)


def test_resume_with_another_compressor_is_refused(tiny_target, small_corpus, tmp_path):
    train_script.run(train_cfg(tiny_target, small_corpus, tmp_path / "a", "compressor=none"))
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    with pytest.raises(Exception, match="compressor"):
        train_script.run(
            train_cfg(
                tiny_target,
                small_corpus,
                tmp_path / "b",
                "compressor=pool",
                "trainer.max_epochs=2",
                f"+ckpt_path={ckpt}",
            )
        )


def test_bad_compressor_values_fail_at_startup(tiny_target, small_corpus, tmp_path):
    cfg = train_cfg(tiny_target, small_corpus, tmp_path, "compressor=prune")
    with open_dict(cfg):
        cfg.compressor.ratio = 0
    with pytest.raises(train_script.StartupError, match="ratio"):
        train_script.run(cfg)
    with open_dict(cfg):
        cfg.compressor = {"type": "zoom"}
    with pytest.raises(train_script.StartupError, match="valid types"):
        train_script.run(cfg)


def test_fast_dev_run_is_a_plain_trainer_override(tiny_target, small_corpus, tmp_path):
    # The smoke command is `python train.py trainer.fast_dev_run=true` (no Hydra `+`).
    cfg = train_cfg(
        tiny_target,
        small_corpus,
        tmp_path,
        "trainer.fast_dev_run=true",
        "trainer.max_steps=-1",
        "trainer.limit_train_batches=null",
    )
    result = train_script.run(cfg)
    assert result["global_step"] == 1  # one batch, not the 4 a full epoch of 16 samples / batch 4 takes
    assert Path(result["export_dir"], "model.safetensors").is_file()


def test_multirun_sweep_lands_each_run_in_its_own_directory(tiny_target, small_corpus, tmp_path):
    # The sweep shape (python train.py -m compressor=...,... trainer.max_epochs=...,...), one batch each.
    sweep = tmp_path / "sweep"
    out = subprocess.run(
        [
            sys.executable,
            "train.py",
            "-m",
            "compressor=none,pool",
            "trainer.max_epochs=1,2",
            "trainer.fast_dev_run=true",
            "debug=tiny",
            f"target.path={tiny_target}",
            f"data.train_urls='{small_corpus}/train-{{000000..000002}}.tar'",
            f"data.val_urls={small_corpus}/val-000000.tar",
            "callbacks.validation_decoding=null",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    runs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert len(runs) == 4, (runs, out.stdout[-2000:])
    combos = set()
    for r in runs:  # one flat directory per run (no nesting from path-valued overrides), each with its drafter
        assert (sweep / r / "drafter" / "model.safetensors").is_file(), (r, list((sweep / r).rglob("*"))[:20])
        cfg = yaml.safe_load((sweep / r / ".hydra" / "config.yaml").read_text())
        combos.add((cfg["compressor"] and cfg["compressor"]["type"], cfg["trainer"]["max_epochs"]))
    assert combos == {(None, 1), (None, 2), ("pool", 1), ("pool", 2)}


def test_unknown_config_choice_lists_the_valid_ones():
    out = subprocess.run(
        [sys.executable, "train.py", "compressor=zoom", "--cfg", "job"], cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode != 0
    assert "Available options" in out.stderr and "resampler" in out.stderr and "select" in out.stderr


def test_too_many_devices_fail_at_startup(tiny_target, small_corpus, tmp_path):
    cfg = train_cfg(tiny_target, small_corpus, tmp_path, "trainer.devices=4096")
    with pytest.raises(train_script.StartupError, match="cores"):
        train_script.run(cfg)
    cfg = train_cfg(tiny_target, small_corpus, tmp_path, "trainer=gpu", "trainer.devices=2")
    if torch.cuda.device_count() < 2:
        with pytest.raises(train_script.StartupError, match="GPUs requested"):
            train_script.run(cfg)


def test_drafter_for_another_target_is_rejected(tiny_target, small_corpus, tmp_path, tiny_llava_for_mismatch):
    result = train_script.run(train_cfg(tiny_target, small_corpus, tmp_path, "compressor=none"))
    with pytest.raises(DrafterMismatchError):
        EagleVLMDrafter.load(result["export_dir"], target=tiny_llava_for_mismatch)


@pytest.fixture
def tiny_llava_for_mismatch():
    from tests.test_target_adapter import build_tiny_llava

    return TargetAdapter(build_tiny_llava())


def test_ddp_two_processes_disjoint_data_identical_weights(tiny_target, small_corpus, tmp_path):
    """A real 2-rank DDP run on CPU (gloo): ranks read disjoint shards and end with identical drafters."""
    script = tmp_path / "ddp_probe.py"
    script.write_text(DDP_PROBE)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, str(script), str(tiny_target), str(small_corpus), str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    keys = [set((tmp_path / f"keys_rank{r}.txt").read_text().split()) for r in (0, 1)]
    assert keys[0] and keys[1] and not keys[0] & keys[1], "ranks saw overlapping samples"
    w0, w1 = (torch.load(tmp_path / f"weights_rank{r}.pt") for r in (0, 1))
    assert w0.keys() == w1.keys()
    assert all(torch.equal(w0[k], w1[k]) for k in w0)


DDP_PROBE = r"""
import os, sys, torch, hydra, lightning as L
from pathlib import Path
from hydra import compose, initialize_config_dir
sys.path.insert(0, ".")
import train  # noqa: F401  (sets PROJECT_ROOT, registers the resolvers)

target, corpus, out = sys.argv[1:4]
with initialize_config_dir(config_dir=str(Path("conf").resolve()), version_base="1.3"):
    cfg = compose(config_name="train", overrides=[
        f"target.path={target}", f"data.train_urls='{corpus}/train-{{000000..000002}}.tar'",
        f"data.val_urls={corpus}/val-000000.tar", "data.generate_if_missing=false", "data.batch_size=2",
        "data.num_workers=0", "data.shuffle_buffer=0", "data.samples_per_epoch=16", "compressor=pool",
        f"paths.output_dir={out}", f"paths.root_dir={Path('.').resolve()}"])

class Probe(L.Callback):
    def __init__(self):
        self.keys = []
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.keys += batch["keys"]
    def on_train_end(self, trainer, module):
        r = trainer.global_rank
        Path(out, f"keys_rank{r}.txt").write_text("\n".join(self.keys))
        weights = {k: v.detach().cpu() for k, v in module.drafter.state_dict().items()}
        torch.save(weights, Path(out, f"weights_rank{r}.pt"))

dm = hydra.utils.instantiate(cfg.data, _convert_="all")
module = hydra.utils.instantiate(cfg.model, _convert_="all")
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0,
                    reload_dataloaders_every_n_epochs=1, callbacks=[Probe()])
trainer.fit(module, datamodule=dm)
"""


def test_throughput_tool_measures_both_loops(tiny_target, small_corpus):
    from specvlm_lit.training.throughput import measure

    out = measure(
        [
            f"target.path={tiny_target}",
            f"data.train_urls='{small_corpus}/train-{{000000..000002}}.tar'",
            f"data.val_urls='{small_corpus}/val-000000.tar'",
            f"data.corpus_dir={small_corpus}",
            "data.generate_if_missing=false",
            "data.batch_size=4",
            "data.num_workers=0",
            "data.shuffle_buffer=0",
            "compressor=pool",
        ],
        batches=2,
        warmup=1,
    )
    assert set(out["samples_per_s"]) == {"teacher_forward", "train_step"}
    assert all(v > 0 for v in out["samples_per_s"].values()) and out["train_over_teacher"] > 0


def test_safe_dirname_keeps_one_short_path_component():
    from specvlm_lit.utils.hydra_resolvers import MAX_DIRNAME, safe_dirname

    assert safe_dirname("compressor=pool,trainer.max_epochs=2") == "compressor=pool,trainer.max_epochs=2"
    name = safe_dirname("bench.assistant=/models/small-llava," + "x=" + "y" * 300)
    assert "/" not in name and len(name) <= MAX_DIRNAME + 3
    assert safe_dirname("") == "run"
