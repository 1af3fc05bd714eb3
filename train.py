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

import os
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

import specvlm_lit.utils.hydra_resolvers  # noqa: F401  (registers ${safe_dirname:...} for sweep dirs)
from specvlm_lit.errors import find_user_error, one_line
from specvlm_lit.training.startup import StartupError, check_config  # StartupError: raised by run(), for callers

ROOT = Path(__file__).resolve().parent
os.environ.setdefault("PROJECT_ROOT", str(ROOT))


def wandb_offline_default(cfg: DictConfig) -> None:
    """W&B runs offline unless credentials exist, so a fresh machine never blocks on a login prompt."""
    has_key = (
        bool(os.environ.get("WANDB_API_KEY"))
        or Path.home().joinpath(".netrc").is_file()
        and "api.wandb.ai" in Path.home().joinpath(".netrc").read_text(errors="ignore")
    )
    for lg in (cfg.get("logger") or {}).values():
        if lg is not None and "offline" in lg and str(lg.offline) == "auto":
            with open_dict(lg):
                lg.offline = not has_key
    if not has_key:
        os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")


def instantiate(node: DictConfig, where: str, **kwargs):
    """``hydra.utils.instantiate`` for the config node at ``where``, with the user's mistakes kept to one line.

    Hydra wraps whatever the target raises in an ``InstantiationException`` (a traceback). A ``UserError`` comes out
    as itself. For the trainer and callbacks, Lightning's refusal of a configured value (``MisconfigurationException``,
    or the ``ValueError`` / ``TypeError`` its constructors raise for bad arguments) becomes a ``StartupError`` naming
    ``where``; anywhere else such errors are bugs and keep their traceback.
    """
    from hydra.errors import InstantiationException
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as e:
        user_error = find_user_error(e)
        if user_error is not None:
            raise user_error from None
        cause = e.__cause__
        while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
            cause = cause.__cause__
        if where.startswith(("trainer", "callbacks")) and isinstance(
            cause, (MisconfigurationException, ValueError, TypeError)
        ):
            raise StartupError(f"{where}: {cause}") from None
        raise


def instantiate_all(cfg: DictConfig, key: str) -> list:
    """Instantiate every non-null entry of a config mapping such as ``callbacks`` or ``logger``."""
    return [instantiate(c, f"{key}.{name}") for name, c in (cfg.get(key) or {}).items() if c is not None]


def export_monitored(trainer: L.Trainer, module, export_dir: Path) -> dict:
    """Export the drafter of the checkpoint that ``ModelCheckpoint`` monitors (its best), else the final weights.

    Returns what was exported. Runs on every rank (loading is collective-free); only rank 0 writes.
    """
    from specvlm_lit.drafter.base import save_atomically

    ckpt = trainer.checkpoint_callback
    best = getattr(ckpt, "best_model_path", "") if ckpt is not None else ""
    source = {"checkpoint": "final weights (no monitored checkpoint was written)"}
    if best and Path(best).is_file():
        state = torch.load(best, map_location="cpu", weights_only=False)["state_dict"]
        module.load_state_dict(state)
        source = {
            "checkpoint": str(best),
            "monitor": ckpt.monitor,
            "score": None if ckpt.best_model_score is None else float(ckpt.best_model_score),
        }
    if trainer.is_global_zero:
        save_atomically(module.drafter, export_dir)
    return source


def run(cfg: DictConfig) -> dict:
    from specvlm_lit.drafter.base import check_export_path

    check_config(cfg)  # devices, value ranges, compressor, ckpt_path: before any model loads
    check_export_path(cfg.export_dir)  # refuse a foreign export_dir now, not after training
    wandb_offline_default(cfg)
    L.seed_everything(cfg.seed, workers=True)
    loggers = instantiate_all(cfg, "logger")
    # The Trainer is built before the data and the models: Lightning checks its settings here, before the target loads.
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        "trainer",
        callbacks=instantiate_all(cfg, "callbacks"),
        logger=loggers or False,
        reload_dataloaders_every_n_epochs=1,
    )
    datamodule: L.LightningDataModule = instantiate(cfg.data, "data", _convert_="all")
    module: L.LightningModule = instantiate(cfg.model, "model", _convert_="all")
    for lg in trainer.loggers:  # the whole composed run config, as lightning-hydra-template logs it
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    export = Path(cfg.export_dir)
    exported = export_monitored(trainer, module, export)
    return {
        "metrics": metrics,
        "export_dir": str(export.resolve()),
        "exported_from": exported,
        "global_step": trainer.global_step,
    }


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        result = run(cfg)
    except Exception as e:
        user_error = find_user_error(e)
        if user_error is None:
            raise
        raise SystemExit(f"error: {one_line(user_error)}") from None  # the user's to fix: one line, no traceback
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        for k, v in sorted(result["metrics"].items()):
            print(f"{k}: {v:.4f}")
        src = result["exported_from"]
        print(
            f"exported: {src['checkpoint']}"
            + (f" (best {src['monitor']} = {src['score']:.4f})" if src.get("score") is not None else "")
        )
        print(result["export_dir"])


if __name__ == "__main__":
    main()
