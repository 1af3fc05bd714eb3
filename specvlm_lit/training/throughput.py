"""Training throughput vs its floor, side by side in one process.

    python -m specvlm_lit.training.throughput [train.py overrides ...] [--batches N]

Runs the same batches through (a) the frozen target forward alone (the teacher forward: the floor of
any online-distillation step) and (b) a full training step (teacher + draft rows + drafter forward,
loss, backward, AdamW step). Reports samples/s of both and their ratio, with the machine noted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[2]


def measure(overrides: list[str], batches: int = 12, warmup: int = 2) -> dict:
    os.environ.setdefault("PROJECT_ROOT", str(ROOT))
    import hydra

    import specvlm_lit.utils.hydra_resolvers  # noqa: F401

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[f"paths.output_dir={ROOT}/outputs/throughput", f"paths.root_dir={ROOT}", *overrides],
        )
    dm = hydra.utils.instantiate(cfg.data, _convert_="all")
    dm.prepare_data()
    data = []
    for b in dm.train_dataloader():
        data.append(b)
        if len(data) == batches + warmup:
            break
    comp = OmegaConf.to_container(cfg.compressor) if cfg.compressor else None
    module = hydra.utils.instantiate(cfg.model, _convert_="all")
    opt = module.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt

    def teacher_only(b):
        module.teacher(b)

    def train_step(b):
        db = module.draft_batch(b)
        loss, _ = module._losses(db, "train")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    results = {}
    for name, fn in (("teacher_forward", teacher_only), ("train_step", train_step)):
        for b in data[:warmup]:
            fn(b)
        n = 0
        t0 = time.perf_counter()
        for b in data[warmup:]:
            fn(b)
            n += b["input_ids"].shape[0]
        results[name] = n / (time.perf_counter() - t0)
    return {
        "samples_per_s": results,
        "train_over_teacher": results["train_step"] / results["teacher_forward"],
        "batches": batches,
        "batch_size": cfg.data.batch_size,
        "compressor": comp and comp.get("type"),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, default=12)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    print(json.dumps(measure(a.overrides, a.batches), indent=2))


if __name__ == "__main__":
    main()
