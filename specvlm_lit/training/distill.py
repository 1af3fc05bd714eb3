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

import math
import time
from dataclasses import dataclass

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric, SumMetric

from ..data.shards import BadSampleMonitor
from ..drafter.compressor import normalize_compressor_config
from ..drafter.eagle import EagleVLMDrafter
from ..drafter.sequence import build_draft_sequence
from ..errors import UserError
from ..target import TargetAdapter


class ConfigMismatchError(UserError):
    """Resuming from a checkpoint that was trained with another target or compressor."""


class _Frozen:
    """Holds the target without registering it as a submodule (no DDP wrap, not in checkpoints)."""

    def __init__(self, adapter: TargetAdapter):
        self.adapter = adapter


@dataclass
class DraftBatch:
    embeds: torch.Tensor      # [B, L, H]
    features: torch.Tensor    # [B, L, H]
    padding: torch.Tensor     # [B, L] 1 = real row
    target_feat: torch.Tensor  # [B, L, H] f_{t+1} per row (zeros where invalid)
    teacher_logits: torch.Tensor  # [B, L, V]
    valid: torch.Tensor       # [B, L] bool: row predicts an assistant-answer token
    branches: list[int | None]
    visual_rows: list[int]    # visual rows the drafter saw, per sample


class OnlineDistillation(L.LightningModule):
    def __init__(self, target_path: str, target_dtype: str = "float32", compressor: dict | None = None,
                 intermediate_size: int | None = None, lambda_logit: float = 0.1, lambda_feat: float = 1.0,
                 optimizer: dict | None = None, warmup_steps: int = 0, feature_noise: float = 0.0,
                 unroll_steps: int = 1, unroll_decay: float = 0.8, max_bad_fraction: float = 0.05,
                 val_decode_samples: int = 0, val_decode_max_new_tokens: int = 48):
        super().__init__()
        if unroll_steps < 1:
            raise ValueError(f"unroll_steps must be >= 1 (1 = no unrolling), got {unroll_steps}")
        if lambda_logit < 0 or lambda_feat < 0 or lambda_logit + lambda_feat == 0:
            raise ValueError(f"loss weights must be >= 0 and not both 0, got lambda_logit={lambda_logit}, lambda_feat={lambda_feat}")
        if feature_noise < 0:
            raise ValueError(f"feature_noise must be >= 0, got {feature_noise}")
        self.save_hyperparameters()
        adapter = TargetAdapter.from_pretrained(target_path, dtype=getattr(torch, target_dtype))
        self._frozen = _Frozen(adapter)
        hidden = adapter.hidden_size
        overrides = {"compressor": normalize_compressor_config(compressor, hidden), "target_name_or_path": str(target_path),
                     "target_fingerprint": adapter.fingerprint()}
        if intermediate_size:
            overrides["intermediate_size"] = int(intermediate_size)
        self.drafter = EagleVLMDrafter.for_target(adapter, **overrides)
        self.drafter.check_target(adapter)
        self.target_fingerprint = adapter.fingerprint()
        self.top1 = torch.nn.ModuleDict({f"{stage}_{k}": MeanMetric() for stage in ("train", "val")
                                         for k in range(1, unroll_steps + 1)})
        n_branches = len(getattr(self.drafter.compressor, "branches", {}) or {})
        self.branch_names = list(getattr(self.drafter.compressor, "branches", {}) or [])
        self.branch_hist = SumMetric() if n_branches else None
        self.visual_rows = MeanMetric()
        self.bad_samples = BadSampleMonitor(max_bad_fraction)
        self._step_start = None
        self._val_prompts: list[tuple[torch.Tensor, torch.Tensor, tuple]] = []

    # ----------------------------------------------------------------------------------------- plumbing
    @property
    def target(self) -> TargetAdapter:
        return self._frozen.adapter

    def setup(self, stage: str) -> None:
        self.target.model.to(self.device)

    def on_fit_start(self) -> None:
        self.target.model.to(self.device)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["specvlm"] = {"target_fingerprint": self.target_fingerprint,
                                 "compressor": self.drafter.config.compressor}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("specvlm", {})
        if saved.get("target_fingerprint") not in (None, self.target_fingerprint):
            raise ConfigMismatchError(
                f"checkpoint was trained for target {saved['target_fingerprint']} but this run's target is "
                f"{self.target_fingerprint}; resume with the same target=... as the original run")
        if "compressor" in saved and saved["compressor"] != self.drafter.config.compressor:
            raise ConfigMismatchError(
                f"checkpoint was trained with compressor {saved['compressor']} but this run uses "
                f"{self.drafter.config.compressor}; resume with the same compressor=... as the original run")

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
            seq = build_draft_sequence(embeds[i], out.hidden[i], ids[i], self.target.image_token_id,
                                       compressor=self.drafter.compressor, grid=grid, length=n,
                                       question_end=int(answer_pos[0]) if answer_pos.numel() else n)
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
        hp = self.hparams
        features = db.features
        if stage == "train" and hp.feature_noise > 0:
            features = features + (torch.rand_like(features) * 2 - 1) * hp.feature_noise
        total, logs = 0.0, {}
        teacher_p = db.teacher_logits[db.valid].float().softmax(-1)
        teacher_top1 = db.teacher_logits[db.valid].argmax(-1)
        for k in range(1, hp.unroll_steps + 1):
            out = self.drafter(db.embeds, features, attention_mask=db.padding)
            pred = out.hidden
            logits = self.target.lm_head(pred[db.valid]).float()
            l_feat = F.smooth_l1_loss(pred[db.valid].float(), db.target_feat[db.valid].float())
            l_logit = -(teacher_p * logits.log_softmax(-1)).sum(-1).mean()
            weight = hp.unroll_decay ** (k - 1)
            total = total + weight * (hp.lambda_logit * l_logit + hp.lambda_feat * l_feat)
            self.top1[f"{stage}_{k}"].update((logits.argmax(-1) == teacher_top1).float())
            logs[f"{stage}/loss_feat_step{k}"] = l_feat
            logs[f"{stage}/loss_logit_step{k}"] = l_logit
            if k < hp.unroll_steps:
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
        for k in range(1, self.hparams.unroll_steps + 1):
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
                self.log(f"{prefix}/{name}", c / max(1, len(db.branches)), batch_size=batch_size,
                         sync_dist=stage == "val")

    # -------------------------------------------------------------------------------------------- steps
    def on_train_batch_start(self, batch, batch_idx) -> None:
        self._step_start = time.perf_counter()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.bad_samples.update(batch["stats"])
        db = self.draft_batch(batch)
        loss, logs = self._losses(db, "train")
        bs = batch["input_ids"].shape[0]
        self._log_common(db, logs, "train", bs)
        self.log("data/bad_samples", float(self.bad_samples.bad), batch_size=bs)
        self.log("data/truncated", float(self.bad_samples.counts["truncated"]), batch_size=bs)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self._step_start is not None:
            dt = time.perf_counter() - self._step_start
            self.log("train/samples_per_s", batch["input_ids"].shape[0] / max(dt, 1e-9), prog_bar=True,
                     batch_size=batch["input_ids"].shape[0])

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        db = self.draft_batch(batch)
        _, logs = self._losses(db, "val")
        self._log_common(db, logs, "val", batch["input_ids"].shape[0])
        self._keep_val_prompts(batch)

    def _keep_val_prompts(self, batch: dict) -> None:
        """Remember a few validation prompts (question up to "ASSISTANT:") for the sigma measurement."""
        for i in range(batch["input_ids"].shape[0]):
            if len(self._val_prompts) >= self.hparams.val_decode_samples:
                return
            answer = batch["loss_mask"][i].nonzero()
            if answer.numel():
                ids = batch["input_ids"][i, : int(answer[0])].unsqueeze(0)
                self._val_prompts.append((ids, batch["pixel_values"][i], tuple(batch["pixel_values"][i].shape[-2:])))

    def on_validation_epoch_end(self) -> None:
        """Real average accepted length (sigma) of greedy tree decoding with the current drafter."""
        prompts, self._val_prompts = self._val_prompts, []
        if not prompts or self.trainer.sanity_checking:
            return
        from ..decoding.acceptance import WarpConfig
        from ..decoding.speculative import SpeculativeDecoder, TreeConfig

        decoder = SpeculativeDecoder(self.target, self.drafter, TreeConfig(), WarpConfig())
        tokens = rounds = 0
        for ids, pixels, (h, w) in prompts:
            feats = self.target.encode_images([pixels])
            out = decoder.generate(ids.to(self.device), image_features=feats, image_grid=self.target.visual_grid(h, w),
                                   max_new_tokens=self.hparams.val_decode_max_new_tokens,
                                   eos_token_id=self.target.text_config.eos_token_id)
            tokens += out.stats.new_tokens
            rounds += out.stats.rounds
        self.log("val/sigma", tokens / max(rounds, 1), prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        hp = self.hparams
        opt_cfg = dict(hp.optimizer or {})
        opt = torch.optim.AdamW(self.drafter.parameters(), lr=opt_cfg.get("lr", 3e-4),
                                betas=tuple(opt_cfg.get("betas", (0.9, 0.95))),
                                weight_decay=opt_cfg.get("weight_decay", 0.0))
        if not hp.warmup_steps:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / hp.warmup_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
