"""Train a SpecVLM drafter for a frozen target VLM by online-logit distillation.

    python train.py                                   # SpecVLM (select) drafter for the embedded target
    python train.py compressor=resampler trainer.devices=8 trainer=ddp
    python train.py -m compressor=none,prune,pool,conv,resampler,select trainer.max_epochs=1,2,3,4,5
    python train.py trainer.fast_dev_run=true          # one batch of everything (smoke test; or debug=fdr)
    python train.py ckpt_path=outputs/train/runs/<run>/checkpoints/last.ckpt   # exact resume

Prints the validation figures and, as its last line, the exported drafter directory
(config.json + model.safetensors + target fingerprint) that decode.py loads.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from specvlm_lit.errors import UserError, one_line

import specvlm_lit.utils.hydra_resolvers  # noqa: F401  (registers ${safe_dirname:...} for sweep dirs)

ROOT = Path(__file__).resolve().parent
os.environ.setdefault("PROJECT_ROOT", str(ROOT))


class StartupError(UserError):
    """A configuration that cannot run, caught before any model work."""


def check_devices(trainer_cfg: DictConfig) -> None:
    accel = str(trainer_cfg.get("accelerator", "cpu"))
    devices = trainer_cfg.get("devices", 1)
    if not isinstance(devices, int) or isinstance(devices, bool):
        return  # "auto" or explicit id lists: Lightning validates those
    if devices < 1:
        raise StartupError(f"trainer.devices must be >= 1, got {devices}")
    if accel in ("gpu", "cuda"):
        have = torch.cuda.device_count()
        if devices > have:
            raise StartupError(f"trainer.devices={devices} GPUs requested but {have} are visible; "
                               f"use trainer.devices={max(have, 1)} or trainer=cpu / trainer=ddp_sim")
    elif accel == "cpu":
        have = os.cpu_count() or 1
        if devices > have:
            raise StartupError(f"trainer.devices={devices} CPU processes requested but this machine has {have} cores; "
                               f"use trainer.devices<={have}")


def wandb_offline_default(cfg: DictConfig) -> None:
    """W&B runs offline unless credentials exist, so a fresh machine never blocks on a login prompt."""
    has_key = bool(os.environ.get("WANDB_API_KEY")) or Path.home().joinpath(".netrc").is_file() and \
        "api.wandb.ai" in Path.home().joinpath(".netrc").read_text(errors="ignore")
    for lg in (cfg.get("logger") or {}).values():
        if lg is not None and "offline" in lg and str(lg.offline) == "auto":
            with open_dict(lg):
                lg.offline = not has_key
    if not has_key:
        os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")


def build_datamodule(cfg: DictConfig, target_path: str):
    from transformers import AutoProcessor

    from specvlm_lit.data.datamodule import ShardDataModule
    from specvlm_lit.synthetic.generate import CorpusSpec, ensure_corpus
    from specvlm_lit.utils.visual_tokens import llava_visual_tokens
    d = cfg.data
    if d.get("generate_if_missing") and d.get("corpus_dir"):
        ensure_corpus(d.corpus_dir, CorpusSpec())
    processor = AutoProcessor.from_pretrained(target_path)
    vision = processor.image_processor
    patch = int(getattr(processor, "patch_size", 0) or 0)
    if patch <= 0:
        raise StartupError(f"the processor in {target_path} has no patch_size; cannot size the image tokens")
    strategy = getattr(processor, "vision_feature_select_strategy", "default")
    num_visual_tokens = functools.partial(llava_visual_tokens, patch_size=patch, strategy=strategy)
    return ShardDataModule(
        d.train_urls, d.val_urls, processor.tokenizer, vision, num_visual_tokens, batch_size=d.batch_size,
        max_length=d.max_length, shuffle_buffer=d.shuffle_buffer, num_workers=d.num_workers, seed=cfg.seed,
        resample_train=d.samples_per_epoch is None, samples_per_epoch=d.samples_per_epoch,
    )


def run(cfg: DictConfig) -> dict:
    from specvlm_lit.drafter.compressor import normalize_compressor_config
    from specvlm_lit.drafter.eagle import save_atomically
    from specvlm_lit.training.distill import OnlineDistillation

    check_devices(cfg.trainer)
    try:  # strict: a bad compressor config fails here, listing the valid choices
        normalize_compressor_config(OmegaConf.to_container(cfg.compressor.compressor) if cfg.compressor.compressor else None)
    except ValueError as e:
        raise StartupError(f"compressor: {e}") from None
    wandb_offline_default(cfg)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg, cfg.target.path)
    dr = cfg.drafter
    module = OnlineDistillation(
        target_path=cfg.target.path, target_dtype=cfg.target.dtype,
        compressor=OmegaConf.to_container(cfg.compressor.compressor) if cfg.compressor.compressor else None,
        intermediate_size=dr.intermediate_size, lambda_logit=dr.lambda_logit, lambda_feat=dr.lambda_feat,
        optimizer=OmegaConf.to_container(dr.optimizer), warmup_steps=dr.warmup_steps, feature_noise=dr.feature_noise,
        unroll_steps=dr.unroll_steps, unroll_decay=dr.unroll_decay, max_bad_fraction=cfg.data.max_bad_fraction,
        val_decode_samples=cfg.val_decode_samples,
    )
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = [hydra.utils.instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                                 reload_dataloaders_every_n_epochs=1)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    export = Path(cfg.export_dir)
    if trainer.is_global_zero:
        save_atomically(module.drafter, export)
    return {"metrics": metrics, "export_dir": str(export.resolve()), "global_step": trainer.global_step}


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        result = run(cfg)
    except UserError as e:  # the user's to fix: one line, no traceback
        raise SystemExit(f"error: {one_line(e)}") from None
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        for k, v in sorted(result["metrics"].items()):
            print(f"{k}: {v:.4f}")
        print(result["export_dir"])


if __name__ == "__main__":
    main()
