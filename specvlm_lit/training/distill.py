"""Online-logit distillation: the frozen target teaches the drafter on the fly, every step.

Per step: the target (eval, no grad) encodes the images and runs over the batch, giving teacher
logits z_p and final features f_p for every position. Each sample becomes drafter rows through
:func:`build_draft_sequence` (EAGLE pairing, visual rows compressed by the drafter's compressor), the
drafter predicts next features f_q, and on assistant-answer positions only we minimise

    lambda_logit * softCE(lm_head(f_q), softmax(z_p)) + lambda_feat * SmoothL1(f_q, f_p).

The target is kept OUT of the module tree (a plain attribute holder): DDP wraps and synchronises only
the drafter + compressor, and Lightning checkpoints hold only them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric, SumMetric

from ..drafter.compressor import normalize_compressor_config
from ..drafter.eagle import EagleVLMDrafter
from ..drafter.sequence import build_draft_sequence
from ..errors import UserError
from ..target import TargetAdapter
from .random_stream import TrainingRandomStream


class ConfigMismatchError(UserError):
    """Resuming from a checkpoint that was trained with another target or compressor."""


class _Frozen:
    """Holds the target without registering it as a submodule (no DDP wrap, not in checkpoints)."""

    def __init__(self, adapter: TargetAdapter):
        self.adapter = adapter


@dataclass
class DraftBatch:
    embeds: torch.Tensor  # [B, L, H]
    features: torch.Tensor  # [B, L, H]
    padding: torch.Tensor  # [B, L] 1 = real row
    target_feat: torch.Tensor  # [B, L, H] f_{t+1} per row (zeros where invalid)
    teacher_logits: torch.Tensor  # [B, L, V]
    valid: torch.Tensor  # [B, L] bool: row predicts an assistant-answer token
    branches: list[int | None]
    visual_rows: list[int]  # visual rows the drafter saw, per sample


#: What a drafter config (conf/drafter/*.yaml) may set, with the values used when it leaves a key out.
DRAFTER_DEFAULTS = {
    "intermediate_size": None,
    "lambda_logit": 0.1,
    "lambda_feat": 1.0,
    "feature_noise": 0.0,
    "unroll_steps": 1,
    "unroll_decay": 0.8,
}


def drafter_settings(drafter: Mapping[str, Any] | None) -> dict:
    """The drafter config with defaults filled in, validated: unknown keys and out-of-range values are refused."""
    given = dict(drafter or {})
    unknown = sorted(set(given) - set(DRAFTER_DEFAULTS))
    if unknown:
        raise ConfigMismatchError(f"drafter: unknown key(s) {unknown}; valid keys are {sorted(DRAFTER_DEFAULTS)}")
    s = {**DRAFTER_DEFAULTS, **given}
    if isinstance(s["unroll_steps"], bool) or not isinstance(s["unroll_steps"], int) or s["unroll_steps"] < 1:
        raise ConfigMismatchError(
            f"drafter.unroll_steps must be an integer >= 1 (1 = no unrolling), got {s['unroll_steps']!r}"
        )
    if s["lambda_logit"] < 0 or s["lambda_feat"] < 0 or s["lambda_logit"] + s["lambda_feat"] == 0:
        raise ConfigMismatchError(
            f"drafter.lambda_logit and drafter.lambda_feat must be >= 0 and not both 0, got "
            f"{s['lambda_logit']} and {s['lambda_feat']}"
        )
    if s["feature_noise"] < 0:
        raise ConfigMismatchError(f"drafter.feature_noise must be >= 0, got {s['feature_noise']}")
    return s


class OnlineDistillation(L.LightningModule):
    """Trains ``drafter`` (settings: :data:`DRAFTER_DEFAULTS`) + ``compressor`` against the frozen target.

    ``optimizer`` and ``scheduler`` are partials (Hydra ``_partial_: true``) that receive the drafter's parameters /
    the optimiser; ``scheduler=None`` keeps the learning rate constant. The scheduler steps every optimiser step.
    """

    def __init__(
        self,
        target_path: str,
        optimizer: Callable[..., torch.optim.Optimizer],
        target_dtype: str = "float32",
        drafter: Mapping[str, Any] | None = None,
        compressor: Mapping[str, Any] | None = None,
        scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    ):
        super().__init__()
        settings = drafter_settings(drafter)
        # The partials are not hyperparameters Lightning can serialise; the run's full config is logged by train.py.
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.settings = settings
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        adapter = TargetAdapter.from_pretrained(target_path, dtype=getattr(torch, target_dtype))
        self._frozen = _Frozen(adapter)
        hidden = adapter.hidden_size
        overrides = {
            "compressor": normalize_compressor_config(compressor, hidden),
            "target_name_or_path": str(target_path),
            "target_fingerprint": adapter.fingerprint(),
        }
        if settings["intermediate_size"]:
            overrides["intermediate_size"] = int(settings["intermediate_size"])
        self.drafter = EagleVLMDrafter.for_target(adapter, **overrides)
        self.drafter.check_target(adapter)
        self.target_fingerprint = adapter.fingerprint()
        unroll_steps = settings["unroll_steps"]
        self.top1 = torch.nn.ModuleDict(
            {f"{stage}_{k}": MeanMetric() for stage in ("train", "val") for k in range(1, unroll_steps + 1)}
        )
        n_branches = len(getattr(self.drafter.compressor, "branches", {}) or {})
        self.branch_names = list(getattr(self.drafter.compressor, "branches", {}) or [])
        self.branch_hist = SumMetric() if n_branches else None
        self.visual_rows = MeanMetric()
        # Exact resume: training steps draw their randomness (Gumbel noise, random pruning) from a checkpointed
        # stream of their own, not from the global RNGs that data loading and Lightning also draw from.
        self.random_stream = TrainingRandomStream()

    # ----------------------------------------------------------------------------------------- plumbing
    @property
    def target(self) -> TargetAdapter:
        return self._frozen.adapter

    def setup(self, stage: str) -> None:
        self.target.model.to(self.device)

    def on_fit_start(self) -> None:
        self.target.model.to(self.device)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["specvlm"] = {
            "target_fingerprint": self.target_fingerprint,
            "compressor": self.drafter.config.compressor,
            "training_random_states": self.random_stream.state_dict(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("specvlm", {})
        if saved.get("target_fingerprint") not in (None, self.target_fingerprint):
            raise ConfigMismatchError(
                f"checkpoint was trained for target {saved['target_fingerprint']} but this run's target is "
                f"{self.target_fingerprint}; resume with the same target=... as the original run"
            )
        if "compressor" in saved and saved["compressor"] != self.drafter.config.compressor:
            raise ConfigMismatchError(
                f"checkpoint was trained with compressor {saved['compressor']} but this run uses "
                f"{self.drafter.config.compressor}; resume with the same compressor=... as the original run"
            )
        self.random_stream.load_state_dict(saved.get("training_random_states", []))

    # ------------------------------------------------------------------------------------------ teacher
    @torch.no_grad()
    def teacher(self, batch: dict):
        t = self.target
        feats = t.encode_images(batch["pixel_values"])
        out = t.forward(batch["input_ids"], attention_mask=batch["attention_mask"], image_features=feats)
        return feats, out.inputs_embeds, out

    def draft_batch(self, batch: dict) -> DraftBatch:
        feats, embeds, out = self.teacher(batch)
        ids, loss_mask = batch["input_ids"], batch["loss_mask"]
        lengths = batch["attention_mask"].sum(1).tolist()
        seqs, rows = [], []
        for i, n in enumerate(lengths):
            n_vis = feats[i].shape[0]
            h, w = batch["pixel_values"][i].shape[-2:]
            grid = self.target.visual_grid(h, w)
            answer_pos = loss_mask[i].nonzero()
            seq = build_draft_sequence(
                embeds[i],
                out.hidden[i],
                ids[i],
                self.target.image_token_id,
                compressor=self.drafter.compressor,
                grid=grid,
                length=n,
                question_end=int(answer_pos[0]) if answer_pos.numel() else n,
            )
            src = seq.source
            ok = src >= 0
            nxt = torch.where(ok, src + 1, torch.zeros_like(src))
            after = torch.where(ok, src + 2, torch.zeros_like(src))
            valid = ok & (after < n)
            valid &= loss_mask[i, after.clamp(max=ids.shape[1] - 1)]
            seqs.append((seq, nxt, valid))
            rows.append(n_vis + seq.position_offset)
        B, L = len(seqs), max(s.length for s, _, _ in seqs)
        H, V = out.hidden.shape[-1], out.logits.shape[-1]
        dev, dt = out.hidden.device, out.hidden.dtype
        e = torch.zeros(B, L, H, device=dev, dtype=dt)
        f = torch.zeros(B, L, H, device=dev, dtype=dt)
        pad = torch.zeros(B, L, device=dev, dtype=torch.long)
        tf = torch.zeros(B, L, H, device=dev, dtype=dt)
        tl = torch.zeros(B, L, V, device=dev, dtype=out.logits.dtype)
        valid = torch.zeros(B, L, device=dev, dtype=torch.bool)
        for i, (seq, nxt, v) in enumerate(seqs):
            n = seq.length
            e[i, :n], f[i, :n], pad[i, :n], valid[i, :n] = seq.embeds, seq.features, 1, v
            tf[i, :n] = out.hidden[i, nxt]
            tl[i, :n] = out.logits[i, nxt]
        branches = [s.compressed.branch if s.compressed is not None else None for s, _, _ in seqs]
        return DraftBatch(e, f, pad, tf, tl, valid, branches, rows)

    # ------------------------------------------------------------------------------------------- losses
    def _losses(self, db: DraftBatch, stage: str):
        hp = self.settings
        features = db.features
        if stage == "train" and hp["feature_noise"] > 0:
            features = features + (torch.rand_like(features) * 2 - 1) * hp["feature_noise"]
        total, logs = 0.0, {}
        teacher_p = db.teacher_logits[db.valid].float().softmax(-1)
        teacher_top1 = db.teacher_logits[db.valid].argmax(-1)
        for k in range(1, hp["unroll_steps"] + 1):
            out = self.drafter(db.embeds, features, attention_mask=db.padding)
            pred = out.hidden
            logits = self.target.lm_head(pred[db.valid]).float()
            l_feat = F.smooth_l1_loss(pred[db.valid].float(), db.target_feat[db.valid].float())
            l_logit = -(teacher_p * logits.log_softmax(-1)).sum(-1).mean()
            weight = hp["unroll_decay"] ** (k - 1)
            total = total + weight * (hp["lambda_logit"] * l_logit + hp["lambda_feat"] * l_feat)
            self.top1[f"{stage}_{k}"].update((logits.argmax(-1) == teacher_top1).float())
            logs[f"{stage}/loss_feat_step{k}"] = l_feat
            logs[f"{stage}/loss_logit_step{k}"] = l_logit
            if k < hp["unroll_steps"]:
                # Training-time test (EAGLE-3 style): the next step feeds the drafter its own predictions
                # in place of the target's features on answer rows, as tree drafting does at depth > 1.
                shifted = torch.cat([features[:, :1], pred[:, :-1]], dim=1)
                use_pred = torch.zeros_like(db.valid)
                use_pred[:, 1:] = db.valid[:, 1:] & db.valid[:, :-1]
                features = torch.where(use_pred[..., None], shifted.to(features.dtype), features)
        logs[f"{stage}/loss"] = total
        return total, logs

    def _log_common(self, db: DraftBatch, logs: dict, stage: str, batch_size: int) -> None:
        loss = logs.pop(f"{stage}/loss")
        self.log_dict(logs, prog_bar=False, batch_size=batch_size, sync_dist=stage == "val")
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=batch_size, sync_dist=stage == "val")
        for k in range(1, self.settings["unroll_steps"] + 1):
            self.log(f"{stage}/top1_step{k}", self.top1[f"{stage}_{k}"], prog_bar=k == 1, batch_size=batch_size)
        self.visual_rows.update(torch.tensor(db.visual_rows, dtype=torch.float32))
        self.log(f"{stage}/drafter_visual_tokens", self.visual_rows, batch_size=batch_size)
        if self.branch_hist is not None:
            counts = torch.zeros(len(self.branch_names), device=self.device)
            for b in db.branches:
                if b is not None:
                    counts[b] += 1
            # train: the Gumbel-Softmax samples of each step; val: the inference-time (argmax) choices, averaged
            # over the validation epoch -- the branch mix decoding will actually see.
            prefix = "gate" if stage == "train" else "val/gate"
            for name, c in zip(self.branch_names, counts):
                self.log(
                    f"{prefix}/{name}", c / max(1, len(db.branches)), batch_size=batch_size, sync_dist=stage == "val"
                )

    # -------------------------------------------------------------------------------------------- steps
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        with self.random_stream.active(self.device):
            db = self.draft_batch(batch)
            loss, logs = self._losses(db, "train")
        bs = batch["input_ids"].shape[0]
        self._log_common(db, logs, "train", bs)
        monitor = getattr(getattr(self.trainer, "datamodule", None), "bad_samples", None)
        if monitor is not None:  # counted by the DataModule (skips happen in loader workers)
            self.log("data/bad_samples", float(monitor.bad), batch_size=bs)
            self.log("data/truncated", float(monitor.counts["truncated"]), batch_size=bs)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        db = self.draft_batch(batch)
        _, logs = self._losses(db, "val")
        self._log_common(db, logs, "val", batch["input_ids"].shape[0])

    def configure_optimizers(self):
        opt = self.optimizer_factory(self.drafter.parameters())
        if self.scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler_factory(opt), "interval": "step"}}
