"""trainer=fsdp: the frozen target's decoder layers sharded over the ranks (FSDP2), the drafter DDP (sharding.py).

The composed config and the shard units are checked in-process; a real 2-process CPU (gloo) run of train.py's
``run`` shards the tiny target, trains, checkpoints and exports, and is compared with an unsharded target.
"""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import hydra
import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from specvlm_lit.drafter.eagle import EagleVLMDrafter
from specvlm_lit.target import TargetAdapter
from specvlm_lit.training.callbacks import ValidationDecoding
from specvlm_lit.training.sharding import (
    ShardedTargetStrategy,
    ShardingError,
    check_collective_safe,
    decoder_layer_classes,
    target_shard_units,
)

REPO = Path(__file__).resolve().parents[1]
#: What Lightning's launcher and the torch rendezvous read from the environment.
RENDEZVOUS_VARS = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "GLOBAL_RANK", "WORLD_SIZE", "RANK")


def compose_fsdp(*overrides: str):
    os.environ.setdefault("PROJECT_ROOT", str(REPO))
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(
            config_name="train",
            overrides=[f"paths.root_dir={REPO}", "paths.output_dir=/tmp/specvlm-test", "trainer=fsdp", *overrides],
        )


def test_fsdp_config_builds_the_sharded_target_strategy():
    cfg = compose_fsdp("trainer.num_nodes=2")
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    strategy = hydra.utils.instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, ShardedTargetStrategy) and not strategy.shard_across_nodes
    assert cfg.trainer.num_nodes == 2  # a plain override: the key is in the config


def test_startup_refuses_validation_decoding_with_a_sharded_target_before_loading_it():
    from specvlm_lit.training.startup import StartupError, check_sharded_target

    with pytest.raises(StartupError, match="callbacks.validation_decoding=null"):
        check_sharded_target(compose_fsdp())
    check_sharded_target(compose_fsdp("callbacks.validation_decoding=null"))
    check_sharded_target(compose_fsdp("callbacks.validation_decoding.samples=0"))


def test_shard_units_are_the_targets_text_decoder_layers_not_the_drafter_or_vision():
    cfg = compose_fsdp()
    module = hydra.utils.instantiate(cfg.model, _convert_="all")  # the embedded target + its drafter
    target = module.target
    units = target_shard_units(target)
    assert [type(u).__name__ for u in units] == ["LlamaDecoderLayer"] * target.num_layers
    assert decoder_layer_classes(target) == (type(units[0]),)
    assert all(u in set(target._language_model().modules()) for u in units)
    drafter_modules = set(module.drafter.modules())
    assert not any(m in drafter_modules for u in units for m in u.modules())
    vision = set(target.model.model.vision_tower.modules())
    assert not any(u in vision for u in units)  # per-rank image counts differ: the tower stays whole
    in_units = sum(p.numel() for u in units for p in u.parameters())
    assert 0 < in_units < sum(p.numel() for p in target.model.parameters())


def test_a_target_without_decoder_layers_is_refused():
    class Flat(torch.nn.Module):
        _no_split_modules = ["LlamaDecoderLayer"]

    class Adapter:
        model = Flat()

        def _language_model(self):
            return torch.nn.Sequential(torch.nn.Linear(2, 2))

    with pytest.raises(ShardingError, match="nothing to shard"):
        target_shard_units(Adapter())


def test_validation_decoding_is_refused_with_a_sharded_target(tmp_path, monkeypatch):
    check_collective_safe([ValidationDecoding(samples=0)])  # off: fine
    from lightning.pytorch.demos.boring_classes import BoringModel

    trainer = L.Trainer(
        strategy=ShardedTargetStrategy(),
        accelerator="cpu",
        devices=1,
        callbacks=[ValidationDecoding(samples=4)],
        default_root_dir=tmp_path,
        logger=False,
    )
    for name in RENDEZVOUS_VARS:  # fit() sets these in os.environ; monkeypatch restores them afterwards
        monkeypatch.setenv(name, os.environ.get(name, ""))
        monkeypatch.delenv(name)
    with pytest.raises(ShardingError, match="callbacks.validation_decoding=null"):  # before the process group starts
        trainer.fit(BoringModel())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_probe(tiny_target, small_corpus, out: Path, devices: int, num_nodes: int, across: bool) -> list[dict]:
    """The probe on ``num_nodes`` x ``devices`` CPU ranks; several nodes = one process each, on this machine."""
    out.mkdir(parents=True, exist_ok=True)
    script = out.parent / "fsdp_probe.py"
    script.write_text(FSDP_PROBE)
    cmd = [sys.executable, str(script), str(tiny_target), str(small_corpus), str(out), str(devices), str(num_nodes)]
    # No inherited LOCAL_RANK & co.: with one, Lightning takes a process as launched from outside and starts no
    # other ranks, and rank 0 waits for them for ever.
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_VARS}
    env.update(PYTHONPATH=str(REPO), MASTER_ADDR="127.0.0.1")
    if num_nodes > 1:  # one node: Lightning's launcher picks the port itself
        env["MASTER_PORT"] = str(free_port())
    nodes = [
        subprocess.Popen(
            [*cmd, str(across).lower()],
            cwd=REPO,
            env={**env, "NODE_RANK": str(n)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # the node's process group: its Lightning-launched ranks go with it on a timeout
        )
        for n in range(num_nodes)
    ]
    errors = []
    for node in nodes:
        try:
            errors.append(node.communicate(timeout=300)[1])
        except subprocess.TimeoutExpired:
            for n in nodes:
                os.killpg(n.pid, signal.SIGKILL)
            pytest.fail(f"a rank hung; stderr of node {nodes.index(node)}: {node.communicate()[1][-3000:]}")
    for node, err in zip(nodes, errors):
        assert node.returncode == 0, err[-3000:]
    return [json.loads((out / f"probe_rank{r}.json").read_text()) for r in range(devices * num_nodes)]


def check_probe(ranks: list[dict], out: Path, num_layers: int, shards: int) -> None:
    for info in ranks:
        assert info["units"] == num_layers and info["param_type"] == "DTensor"
        assert info["local_numel"] * shards == info["full_numel"]  # each rank holds 1/shards of each layer
        assert info["teacher_max_abs_diff"] < 1e-5  # the sharded forward == the whole target's
        assert info["global_step"] > 0
    weights = [torch.load(out / f"drafter_rank{r}.pt") for r in range(len(ranks))]
    for w in weights[1:]:  # DDP kept the drafters identical
        assert w.keys() == weights[0].keys() and all(torch.equal(w[k], weights[0][k]) for k in w)


@pytest.mark.slow
def test_two_cpu_processes_shard_the_target_train_and_export_the_drafter(tiny_target, small_corpus, tmp_path):
    """train.py's run() under trainer=fsdp on 2 gloo ranks: sharded layers, unchanged teacher, identical drafters,
    drafter-only checkpoints that load into a plain module, a loadable export."""
    out = tmp_path / "run"
    ranks = run_probe(tiny_target, small_corpus, out, devices=2, num_nodes=1, across=False)
    target = TargetAdapter.from_pretrained(tiny_target)
    check_probe(ranks, out, target.num_layers, shards=2)
    # Checkpoints hold the drafter only and load into a module built the ordinary way (one process, no sharding).
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    plain = hydra.utils.instantiate(
        compose_fsdp(f"target.path={tiny_target}", "compressor=pool").model, _convert_="all"
    )
    plain.load_state_dict(state, strict=True)
    exported = EagleVLMDrafter.load(ranks[0]["export_dir"], target=target).state_dict()
    drafter = torch.load(out / "drafter_rank0.pt")
    assert all(torch.equal(v.cpu(), drafter[k]) for k, v in exported.items())


@pytest.mark.slow
@pytest.mark.parametrize("across", [False, True])
def test_two_nodes_replicate_or_shard_the_target_across_nodes(tiny_target, small_corpus, tmp_path, across):
    """2 "nodes" x 1 process (Lightning's own launcher, NODE_RANK): by default each node holds whole layers (sharded
    within the node of 1, replicated over nodes: HSDP); shard_across_nodes=true splits them over both."""
    out = tmp_path / "run"
    ranks = run_probe(tiny_target, small_corpus, out, devices=1, num_nodes=2, across=across)
    check_probe(ranks, out, TargetAdapter.from_pretrained(tiny_target).num_layers, shards=2 if across else 1)


FSDP_PROBE = r"""
import json, sys, torch, lightning as L
from pathlib import Path
from hydra import compose, initialize_config_dir
sys.path.insert(0, ".")
import train
from specvlm_lit.target import TargetAdapter
from specvlm_lit.training.sharding import is_sharded, target_shard_units

target, corpus, out, devices, num_nodes, across = sys.argv[1:7]

class ShardProbe(L.Callback):
    def on_train_end(self, trainer, module):
        r = trainer.global_rank
        units = target_shard_units(module.target)
        p = next(units[0].parameters())
        ids = torch.arange(3, 40)[None]
        sharded = module.target.forward(ids).logits  # a collective: every rank runs it
        whole = TargetAdapter.from_pretrained(target).forward(ids).logits
        info = {"units": len(units) if is_sharded(module.target.model) else 0, "param_type": type(p).__name__,
                "local_numel": p.to_local().numel(), "full_numel": p.numel(),
                "teacher_max_abs_diff": float((sharded - whole).abs().max()), "global_step": trainer.global_step}
        Path(out, f"probe_rank{r}.json").write_text(json.dumps(info))
        weights = {k: v.detach().cpu() for k, v in module.drafter.state_dict().items()}
        torch.save(weights, Path(out, f"drafter_rank{r}.pt"))

with initialize_config_dir(config_dir=str(Path("conf").resolve()), version_base="1.3"):
    cfg = compose(config_name="train", overrides=[
        "debug=tiny", "trainer=fsdp", "trainer.accelerator=cpu", f"trainer.devices={devices}",
        f"trainer.num_nodes={num_nodes}", f"trainer.strategy.shard_across_nodes={across}", "trainer.precision=32",
        "callbacks.validation_decoding=null", "+callbacks.probe._target_=__main__.ShardProbe",
        f"target.path={target}", f"data.corpus_dir={corpus}",
        f"data.train_urls='{corpus}/train-{{000000..000002}}.tar'",
        # one validation shard per rank: with a sharded target every rank must run as many validation batches
        f"data.val_urls=[{corpus}/val-000000.tar,{corpus}/val-000000.tar]",
        "compressor=pool", f"paths.output_dir={out}", f"paths.root_dir={Path('.').resolve()}"])
result = train.run(cfg)
rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
info = json.loads(Path(out, f"probe_rank{rank}.json").read_text())
Path(out, f"probe_rank{rank}.json").write_text(json.dumps({**info, "export_dir": result["export_dir"]}))
"""
