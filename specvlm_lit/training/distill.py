"""Online-logit distillation: the frozen target teaches the drafter on the fly, every step.

Per step: the target (eval, no grad) encodes the images and runs over the batch, giving teacher
logits z_p, final features f_p and (EAGLE-3) the hidden states of the layers the drafter reads, for
every position, in one forward. The drafter turns them into feature rows (``project_features``);
each sample becomes drafter rows through :func:`build_draft_sequence` (EAGLE pairing, visual rows
compressed by the drafter's compressor), the drafter predicts, and on assistant-answer positions
only we minimise

    lambda_logit * softCE(head(f_q), softmax(z_p)) + lambda_feat * SmoothL1(f_q, f_p)

(the feature term only for drafters whose output regresses the target feature, EAGLE-2; EAGLE-3
has its own head and trains on the logit term alone). With a pruned draft vocabulary the teacher
distribution is renormalised over it, as SpecForge does.

Training-time test (``unroll_steps = k > 1``) feeds the drafter its own predictions for k steps.
``unroll_mode=rerun`` reruns the whole sequence with predicted features (the earlier EAGLE-2 option);
``unroll_mode=chain`` is EAGLE-3's: step j's row t is the draft of token t+1+j from the chain of
its own step-(j-1) prediction, attending to the true-feature rows <= t and its own chain only,
exactly the view a depth-(j+1) tree node has at decoding time.

The target is kept OUT of the module tree (a plain attribute holder): DDP wraps and synchronises only
the drafter + compressor, and Lightning checkpoints hold only them. Under ``trainer=fsdp`` its decoder layers are
sharded over the ranks instead of moved whole to each device (training/sharding.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric, SumMetric

from ..data.shards import sample_images
from ..drafter.base import DrafterLoadError, drafter_class
from ..drafter.compressor import normalize_compressor_config
from ..drafter.sequence import build_draft_sequence
from ..errors import UserError
from ..target import TargetAdapter
from .random_stream import TrainingRandomStream
from .sharding import place_target


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
    source: torch.Tensor | None = None  # [B, L] long: target position of each row, -1 compressed / padding


#: What a drafter config (conf/drafter/*.yaml) may set for training, with the values used when it leaves a key
#: out. Any other key is the drafter type's own (``DraftModel.config_keys``, passed to its config).
DRAFTER_DEFAULTS = {
    "model_type": "eagle_vlm",
    "intermediate_size": None,
    "lambda_logit": 0.1,
    "lambda_feat": 1.0,
    "feature_noise": 0.0,
    "unroll_steps": 1,
    "unroll_decay": 0.8,
    "unroll_mode": "rerun",
    "vocab_samples": None,
}
UNROLL_MODES = ("rerun", "chain")


def drafter_settings(drafter: Mapping[str, Any] | None) -> dict:
    """The drafter config with defaults filled in, validated: unknown keys and out-of-range values are refused."""
    given = dict(drafter or {})
    model_type = given.get("model_type", DRAFTER_DEFAULTS["model_type"])
    try:
        cls = drafter_class(model_type)
    except DrafterLoadError as e:
        raise ConfigMismatchError(str(e)) from None
    own = {k: v for k, v in given.items() if k not in DRAFTER_DEFAULTS}
    unknown = sorted(set(own) - set(cls.config_keys))
    if unknown:
        valid = sorted(set(DRAFTER_DEFAULTS) | set(cls.config_keys))
        raise ConfigMismatchError(f"drafter: unknown key(s) {unknown}; valid keys are {valid}")
    s = {**DRAFTER_DEFAULTS, **{k: v for k, v in given.items() if k in DRAFTER_DEFAULTS}, "config": own}
    if s["unroll_mode"] not in UNROLL_MODES:
        raise ConfigMismatchError(f"drafter.unroll_mode must be one of {list(UNROLL_MODES)}, got {s['unroll_mode']!r}")
    if s["lambda_feat"] > 0 and not cls.feature_regression:
        raise ConfigMismatchError(
            f"drafter.lambda_feat must be 0 for model_type {model_type!r}: its output is not a target feature (it "
            f"has its own head), so there is nothing to regress; got {s['lambda_feat']}"
        )
    if s["vocab_samples"] is not None and (not isinstance(s["vocab_samples"], int) or s["vocab_samples"] < 1):
        raise ConfigMismatchError(
            f"drafter.vocab_samples must be null (all) or an integer >= 1, got {s['vocab_samples']!r}"
        )
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
            **settings["config"],
            "compressor": normalize_compressor_config(compressor, hidden),
            "target_name_or_path": str(target_path),
            "target_fingerprint": adapter.fingerprint(),
        }
        if settings["intermediate_size"]:
            overrides["intermediate_size"] = int(settings["intermediate_size"])
        try:
            self.drafter = drafter_class(settings["model_type"]).for_target(adapter, **overrides)
        except ValueError as e:  # a drafter config value out of range (hidden_layers, draft_vocab_size, ...)
            raise ConfigMismatchError(f"drafter: {e}") from None
        self._draft_vocab_ready = False
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
        place_target(self.target, self.trainer.strategy, self.device)
        if stage == "fit":
            self._build_draft_vocab()

    def _build_draft_vocab(self) -> None:
        """A pruned draft vocabulary = the most frequent answer tokens of the training shards (deterministic, so every
        rank builds the same one; a resumed run's checkpoint then restores the trained head and the same mapping)."""
        if getattr(self.drafter, "d2t", None) is None or self._draft_vocab_ready:
            return
        from ..data.sources import expand_shards
        from ..drafter.vocab import answer_token_counts, most_frequent

        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "encoder"):
            raise ConfigMismatchError(
                "drafter.draft_vocab_size needs the training data to count token frequencies; train with a "
                "ShardDataModule (data=synthetic|llava)"
            )
        counts = answer_token_counts(
            expand_shards(dm.train_urls),
            dm.encoder.prompts,
            self.target.vocab_size,
            max_samples=self.settings["vocab_samples"],
            max_length=dm.encoder.max_length,
        )
        self.drafter.set_draft_vocab(most_frequent(counts, int(self.drafter.d2t.numel())), target=self.target)
        self.drafter.to(self.device)
        self._draft_vocab_ready = True

    def on_fit_start(self) -> None:
        place_target(self.target, self.trainer.strategy, self.device)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["specvlm"] = {
            "target_fingerprint": self.target_fingerprint,
            "model_type": self.drafter.config.model_type,
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
        if saved.get("model_type", "eagle_vlm") != self.drafter.config.model_type:
            raise ConfigMismatchError(
                f"checkpoint was trained with drafter model_type {saved.get('model_type', 'eagle_vlm')!r} but this run "
                f"uses {self.drafter.config.model_type!r}; resume with the same drafter=... as the original run"
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
        out = t.forward(
            batch["input_ids"],
            attention_mask=batch["attention_mask"],
            image_features=feats,
            hidden_layers=self.drafter.hidden_layers,
        )
        return feats, out.inputs_embeds, out

    def draft_batch(self, batch: dict) -> DraftBatch:
        feats, embeds, out = self.teacher(batch)
        ids, loss_mask = batch["input_ids"], batch["loss_mask"]
        # The drafter's view of the target: its feature rows (EAGLE-3: fc over the chosen layers, trained here, so
        # outside the teacher's no_grad) and its token-side rows (visual embeddings or placeholder embeddings).
        rows_f = self.drafter.project_features(out)
        embeds = self.drafter.token_embeds(self.target, ids, embeds)
        lengths = batch["attention_mask"].sum(1).tolist()
        seqs, rows = [], []
        for i, n in enumerate(lengths):
            # A sample holds any number of images / videos (none: text only); each visual is compressed on its own,
            # with the family's layout of it (AnyRes tiles, Qwen merged patches, video frames).
            layouts = self.target.layouts_of(sample_images(batch, i))
            n_vis = sum(layout.num_tokens for layout in layouts)  # from the layout: no device count (host sync)
            answer_pos = loss_mask[i].nonzero()
            seq = build_draft_sequence(
                embeds[i],
                rows_f[i],
                ids[i],
                self.target.visual_token_ids,
                compressor=self.drafter.compressor,
                layouts=layouts,
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
        f = torch.zeros(B, L, H, device=dev, dtype=rows_f.dtype)
        source = torch.full((B, L), -1, device=dev, dtype=torch.long)
        pad = torch.zeros(B, L, device=dev, dtype=torch.long)
        tf = torch.zeros(B, L, H, device=dev, dtype=dt)
        tl = torch.zeros(B, L, V, device=dev, dtype=out.logits.dtype)
        valid = torch.zeros(B, L, device=dev, dtype=torch.bool)
        for i, (seq, nxt, v) in enumerate(seqs):
            n = seq.length
            e[i, :n], f[i, :n], pad[i, :n], valid[i, :n] = seq.embeds, seq.features, 1, v
            source[i, :n] = seq.source
            tf[i, :n] = out.hidden[i, nxt]
            tl[i, :n] = out.logits[i, nxt]
        branches = [s.compressed.branch if s.compressed is not None else None for s, _, _ in seqs]
        return DraftBatch(e, f, pad, tf, tl, valid, branches, rows, source)

    # ------------------------------------------------------------------------------------------- losses
    def _teacher(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(soft targets over the draft vocabulary, top-1 target ids over the whole vocabulary) of teacher logits."""
        vocab = self.drafter.draft_vocab
        restricted = logits if vocab is None else logits.index_select(-1, vocab.to(logits.device))
        return restricted.float().softmax(-1), logits.argmax(-1)

    def _step_loss(self, pred, rows, teacher_logits, target_feat, k: int, stage: str, logs: dict):
        """Weighted loss of unrolled step ``k`` on the rows ``rows`` (bool [B, L]), logging its terms and top-1."""
        hp = self.settings
        teacher_p, teacher_top1 = self._teacher(teacher_logits[rows])
        logits = self.drafter.head_logits(pred[rows], self.target).float()
        vocab = self.drafter.draft_vocab
        top1 = logits.argmax(-1) if vocab is None else vocab.to(logits.device)[logits.argmax(-1)]
        l_logit = -(teacher_p * logits.log_softmax(-1)).sum(-1).mean()
        loss = hp["lambda_logit"] * l_logit
        if self.drafter.feature_regression:
            l_feat = F.smooth_l1_loss(pred[rows].float(), target_feat[rows].float())
            loss = loss + hp["lambda_feat"] * l_feat
            logs[f"{stage}/loss_feat_step{k}"] = l_feat
        self.top1[f"{stage}_{k}"].update((top1 == teacher_top1).float())
        logs[f"{stage}/loss_logit_step{k}"] = l_logit
        return hp["unroll_decay"] ** (k - 1) * loss

    def _losses(self, db: DraftBatch, stage: str):
        hp = self.settings
        features = db.features
        if stage == "train" and hp["feature_noise"] > 0:
            features = features + (torch.rand_like(features) * 2 - 1) * hp["feature_noise"]
        if hp["unroll_mode"] == "chain":
            return self._losses_chain(db, features, stage)
        total, logs = 0.0, {}
        for k in range(1, hp["unroll_steps"] + 1):
            out = self.drafter(db.embeds, features, attention_mask=db.padding)
            pred = out.hidden
            total = total + self._step_loss(pred, db.valid, db.teacher_logits, db.target_feat, k, stage, logs)
            if k < hp["unroll_steps"]:
                # Training-time test (EAGLE-3 style): the next step feeds the drafter its own predictions
                # in place of the target's features on answer rows, as tree drafting does at depth > 1.
                shifted = torch.cat([features[:, :1], pred[:, :-1]], dim=1)
                use_pred = torch.zeros_like(db.valid)
                use_pred[:, 1:] = db.valid[:, 1:] & db.valid[:, :-1]
                features = torch.where(use_pred[..., None], shifted.to(features.dtype), features)
        logs[f"{stage}/loss"] = total
        return total, logs

    def _losses_chain(self, db: DraftBatch, features: torch.Tensor, stage: str):
        """EAGLE-3 training-time test (module docstring): step j appends L rows to one draft KV cache; row t attends
        to the step-0 rows <= t (true features) and to its own rows of steps 1..j (a diagonal per step)."""
        hp = self.settings
        B, L, H = db.embeds.shape
        dev = db.embeds.device
        real = db.padding.bool()
        causal = torch.ones(L, L, dtype=torch.bool, device=dev).tril()
        blocks = [causal[None] & real[:, None, :]]
        diagonal = torch.eye(L, dtype=torch.bool, device=dev)[None].expand(B, L, L)
        cache = self.drafter.new_cache()
        total, logs = 0.0, {}
        rows = torch.arange(L, device=dev)
        for j in range(hp["unroll_steps"]):
            if j > 0:
                blocks.append(diagonal)
            # Row t of step j holds token t+1+j (the row j further on) and predicts the token after it.
            ahead = (rows + j).clamp(max=L - 1)
            inside = (rows + j) < L
            embeds = db.embeds[:, ahead] * inside[None, :, None]
            chain = inside[None] & (db.source >= 0) & (db.source[:, ahead] == db.source + j)
            valid = chain & db.valid[:, ahead]
            out = self.drafter(
                embeds,
                features,
                position_ids=(rows + j)[None].expand(B, L),
                attention_mask=torch.cat(blocks, dim=-1)[:, None],
                past_key_values=cache,
            )
            pred = out.hidden
            if bool(valid.any()):
                teacher = db.teacher_logits[:, ahead]
                total = total + self._step_loss(pred, valid, teacher, db.target_feat[:, ahead], j + 1, stage, logs)
            features = pred
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
