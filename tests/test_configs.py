"""Every option of every config group composes, resolves, and names real callables with real arguments.

lightning-hydra-template's "compose every config" test, made stricter: each `_target_` must import, and every key
next to it must be a parameter of that callable, so a typo in a YAML file fails here rather than mid-run.
"""

import inspect
import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import get_object
from omegaconf import OmegaConf

import specvlm_lit.utils.hydra_resolvers  # noqa: F401
from specvlm_lit.drafter.compressor import normalize_compressor_config
from specvlm_lit.training.distill import drafter_settings

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
# conf/decode is decode.py's own directory and conf/shared is on both search paths: neither is a train.py group.
NOT_TRAIN_GROUPS = {"decode", "shared"}
# Values a user must give (`???` in the config) for the option to compose.
REQUIRED = {
    ("target", "local"): ["target.path=/models/llava-1.5-7b-hf"],
    ("data", "llava"): ["data.train_urls='/data/train-{000000..000009}.tar'", "data.val_urls=/data/val-000000.tar"],
}
HYDRA_KEYS = {"_target_", "_partial_", "_convert_", "_recursive_", "_args_"}


def train_options() -> list[tuple[str, str]]:
    return [
        (g.name, f.stem)
        for g in sorted(CONF.iterdir())
        if g.is_dir() and g.name not in NOT_TRAIN_GROUPS
        for f in sorted(g.glob("*.yaml"))
    ]


def compose_train(*overrides: str):
    os.environ.setdefault("PROJECT_ROOT", str(REPO))
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            config_name="train", overrides=[f"paths.root_dir={REPO}", "paths.output_dir=/tmp/specvlm-test", *overrides]
        )


def check_targets(node, where: str = "") -> int:
    """Import every `_target_` and check its sibling keys are parameters of it; returns how many were checked."""
    checked = 0
    if isinstance(node, dict):
        if "_target_" in node:
            fn = get_object(node["_target_"])
            params = inspect.signature(fn).parameters
            if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
                unknown = set(node) - HYDRA_KEYS - set(params)
                assert not unknown, f"{where}: {node['_target_']} takes no argument(s) {sorted(unknown)}"
            checked += 1
        for k, v in node.items():
            checked += check_targets(v, f"{where}.{k}" if where else k)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            checked += check_targets(v, f"{where}[{i}]")
    return checked


def test_the_groups_are_the_documented_ones():
    groups = {g for g, _ in train_options()}
    assert {
        "target",
        "data",
        "model",
        "drafter",
        "compressor",
        "trainer",
        "logger",
        "callbacks",
        "experiment",
        "debug",
    } <= groups


@pytest.mark.parametrize("group,option", train_options())
def test_every_option_composes_and_names_real_callables(group, option):
    cfg = compose_train(f"{group}={option}", *REQUIRED.get((group, option), []))
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    # The four objects train.py instantiates are all there, each from a `_target_`.
    for key in ("data", "model", "trainer"):
        assert "_target_" in resolved[key], key
    assert check_targets(resolved) >= 3
    normalize_compressor_config(resolved["compressor"])  # strict: raises on a bad compressor config
    drafter_settings(resolved["drafter"])
    assert resolved["model"]["compressor"] == resolved["compressor"]  # one source for each setting
    assert resolved["model"]["target_path"] == resolved["target"]["path"] == resolved["data"]["processor"]


def test_decode_config_composes_with_plain_path_values():
    os.environ.setdefault("PROJECT_ROOT", str(REPO))
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF / "decode"), version_base="1.3"):
        cfg = compose(config_name="decode", overrides=[f"paths.root_dir={REPO}", "target=/models/t", "drafter=/runs/d"])
    assert cfg.target == "/models/t" and cfg.drafter == "/runs/d"  # no group of the same name to collide with
    assert cfg.mode == "generate" and cfg.tree.depth >= 1
