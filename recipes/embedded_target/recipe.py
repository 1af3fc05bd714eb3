"""Lightning recipe that trains the embedded target VLM from scratch on the synthetic corpus.

The model is a stock ``transformers.LlavaForConditionalGeneration`` (CLIP vision tower + Llama LM),
trained end to end with next-token cross-entropy on assistant answers. Images keep their own
resolution; the CLIP tower interpolates its position embeddings for sizes other than its native one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling

from specvlm_lit.target import encode_by_size, llava_image_features


def build_target_config(tokenizer, vision: dict, text: dict, vision_feature_layer: int = -1) -> LlavaConfig:
    # Round the vocabulary up to a multiple of 64: room for added tokens, friendlier matmul shapes.
    vocab_size = int(math.ceil(len(tokenizer) / 64) * 64)
    return LlavaConfig(
        vision_config=CLIPVisionConfig(**vision),
        text_config=LlamaConfig(
            vocab_size=vocab_size,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
            **text,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids(tokenizer.image_token),
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )


def check_same_shape(theirs, ours, keys, what: str, fix_key: str) -> None:
    """Raise ``ValueError`` naming every ``keys`` entry where two HF configs differ, and the recipe key to set."""
    a, b = theirs.to_dict(), ours.to_dict()
    diff = {k: (a.get(k), b.get(k)) for k in keys if a.get(k) != b.get(k)}
    if diff:
        raise ValueError(f"{what} has another shape (theirs, ours): {diff}; set {fix_key} to match it")


def encode_images_with_grad(
    model: LlavaForConditionalGeneration, images: Sequence[torch.Tensor]
) -> BaseModelOutputWithPooling:
    """Visual embeddings for images of possibly different sizes, in input order (differentiable).

    Same-size images share one tower call. Wrapped as the ``mm_encoder_outputs["image"]`` object that
    ``LlavaForConditionalGeneration.forward`` / ``generate`` accept in place of ``pixel_values``.
    """
    return BaseModelOutputWithPooling(
        pooler_output=encode_by_size(
            images,
            lambda pixels: llava_image_features(
                model, pixels.to(model.device, model.dtype), interpolate_pos_encoding=True
            ),
        )
    )


def answer_loss(
    logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token CE over assistant-answer tokens, and top-1 accuracy on them."""
    target_mask = loss_mask[:, 1:]
    pred = logits[:, :-1][target_mask]
    gold = input_ids[:, 1:][target_mask]
    return F.cross_entropy(pred.float(), gold), (pred.argmax(-1) == gold).float().mean()


def attribute_word_groups(
    tokenizer,
    groups: dict[str, Sequence[str]],
    *,
    user: str = "augment.attribute_swap_p",
    fix: str = "set augment.attribute_swap_p=0 or use the corpus tokenizer",
) -> list[list[int]]:
    """Token ids of each group's words as they appear mid-sentence (" orange"), one token per word.

    ``swap_attribute_words`` (and the diagnosis probes) need single-token words; a tokenizer that
    splits one is rejected here, naming ``user`` and the ``fix``.
    """
    out = []
    for name, words in groups.items():
        ids = []
        for w in words:
            enc = tokenizer.encode(" " + w, add_special_tokens=False)
            if len(enc) != 1:
                raise ValueError(
                    f"{user}: the {name} word {w!r} is {len(enc)} tokens in this tokenizer, not one; {fix}"
                )
            ids.append(enc[0])
        out.append(ids)
    return out


def swap_attribute_words(
    input_ids: torch.Tensor,
    answer_mask: torch.Tensor,
    groups: list[list[int]],
    p: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Input-side noise: each answer token from a group becomes another word of its group with probability ``p``.

    Only the model's *input* changes; the loss keeps the clean tokens as labels. A small LM otherwise learns
    which shape follows which colour word in its own answer ("orange" -> never "circle" in training) and
    trusts that over the image; with the colour it just wrote sometimes wrong, the shape must come from
    the picture. No image changes, so the held-out colour+shape pairs are still never drawn in training.
    """
    if p <= 0:
        return input_ids
    noisy = input_ids.clone()
    coin = torch.rand(input_ids.shape, generator=generator, device=input_ids.device) < p
    for ids in groups:
        members = torch.tensor(ids, device=input_ids.device)
        hit = torch.isin(input_ids, members) & answer_mask & coin
        if not hit.any():
            continue
        # Index of each hit within its group, shifted by 1..n-1: always a different word of the group.
        index = (input_ids[hit].unsqueeze(-1) == members).float().argmax(-1)
        shift = torch.randint(1, len(ids), index.shape, generator=generator, device=input_ids.device)
        noisy[hit] = members[(index + shift) % len(ids)]
    return noisy


def warmup_cosine(optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> dict:
    """Per-step LR schedule for Lightning: linear warm-up, then cosine decay to ``min_lr_ratio``."""

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, schedule), "interval": "step"}


class TargetPretraining(L.LightningModule):
    """Stage 2: the whole VLM on the instruction corpus, optionally from a pre-trained, frozen tower.

    With ``vision_state`` (stage 1's tower, see ``vision_pretrain``) and ``freeze_vision`` the
    recipe mirrors LLaVA: the tower keeps its grounded features and only the projector and the
    language model learn, which also skips the tower's backward pass.
    """

    def __init__(
        self,
        config: LlavaConfig,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_steps: int = 100,
        betas: tuple[float, float] = (0.9, 0.98),
        min_lr_ratio: float = 0.1,
        vision_state: dict | None = None,
        freeze_vision: bool = False,
        init_state: dict | None = None,
        attribute_swap_p: float = 0.0,
        attribute_groups: list[list[int]] | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["config", "vision_state", "init_state"])
        if not 0.0 <= attribute_swap_p < 1.0:
            raise ValueError(f"augment.attribute_swap_p={attribute_swap_p}: use a probability in [0, 1)")
        if attribute_swap_p > 0 and not attribute_groups:
            raise ValueError("attribute_swap_p > 0 needs attribute_groups (token ids of the colour and shape words)")
        self.model = LlavaForConditionalGeneration(config)
        if init_state is not None:  # continue from a built target (``init_from``): every weight, tower included
            self.model.load_state_dict(init_state)
        if vision_state is not None:
            self.model.model.vision_tower.load_state_dict(vision_state)
        if freeze_vision:
            if vision_state is None and init_state is None:
                raise ValueError(
                    "freeze_vision=true needs a pre-trained tower: set vision_pretrain.steps > 0 "
                    "(or vision_pretrain.from_tower / from_target, or init_from)"
                )
            self.model.model.vision_tower.requires_grad_(False)

    def forward(self, batch: dict, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        feats = encode_images_with_grad(self.model, batch["pixel_values"])
        ids = batch["input_ids"] if input_ids is None else input_ids
        return self.model(
            input_ids=ids, attention_mask=batch["attention_mask"], mm_encoder_outputs={"image": feats}
        ).logits

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        noisy = swap_attribute_words(
            batch["input_ids"], batch["loss_mask"], hp.attribute_groups or [], hp.attribute_swap_p
        )
        loss, acc = answer_loss(self(batch, noisy), batch["input_ids"], batch["loss_mask"])
        bs = batch["input_ids"].shape[0]
        self.log_dict({"train/loss": loss, "train/token_acc": acc}, prog_bar=True, batch_size=bs)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, acc = answer_loss(self(batch), batch["input_ids"], batch["loss_mask"])
        self.log_dict({"val/loss": loss, "val/token_acc": acc}, prog_bar=True, batch_size=batch["input_ids"].shape[0])

    def configure_optimizers(self):
        hp = self.hparams
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        decay = [p for n, p in named if p.ndim >= 2 and "embed" not in n]
        no_decay = [p for n, p in named if not (p.ndim >= 2 and "embed" not in n)]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr,
            betas=tuple(hp.betas),
        )
        return {
            "optimizer": opt,
            "lr_scheduler": warmup_cosine(opt, hp.warmup_steps, max(self.trainer.max_steps, 1), hp.min_lr_ratio),
        }
