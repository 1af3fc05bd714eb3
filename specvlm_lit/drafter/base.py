"""The drafter protocol every drafter type implements, and the registry that maps ``model_type`` to its class.

What the trainer (:mod:`specvlm_lit.training.distill`) and the decoders call, and nothing else:

* :attr:`DraftModel.hidden_layers` - the target layers whose inputs the drafter reads (``()`` = only the target's
  final-norm hidden state); the target returns them from the same forward that gives the logits
  (``TargetAdapter.forward(..., hidden_layers=...)``);
* :meth:`DraftModel.project_features` - target output -> the ``[B, T, H]`` feature rows ``f_t`` (EAGLE-2: the final
  hidden state; EAGLE-3: ``fc`` of the concatenated layer states). Everything downstream (pairing, the visual
  compressor, the draft KV cache) works on these H-wide rows, whatever the drafter type;
* :meth:`DraftModel.token_embeds` - the token-side rows ``e_{t+1}`` (visual embeddings at image rows, or the image
  placeholder's token embedding, as some serving engines feed a drafter: ``image_rows``);
* ``forward(token_embeds, features, position_ids, attention_mask, past_key_values, use_cache)`` - one draft step
  over ``T`` rows with a KV cache, returning :class:`DrafterOutput` (``hidden`` fed back as the next feature);
* :meth:`DraftModel.head_logits` / :attr:`DraftModel.draft_vocab` / :meth:`DraftModel.draft_logprobs` - draft
  logits over the drafter's (possibly pruned) vocabulary, and log-probs over the *target* vocabulary;
* ``new_cache()``, ``compressor``, ``num_visual_tokens(layout)``, :meth:`DraftModel.check_target`,
  :meth:`DraftModel.for_target`, :meth:`DraftModel.load`.

A new drafter type is one module with a ``PreTrainedConfig`` / :class:`DraftModel` pair decorated with
:func:`register_drafter`, plus one ``conf/drafter/<name>.yaml`` whose ``model_type`` names it. Every loader goes
through :func:`load_drafter`, which dispatches on the exported ``config.json``'s ``model_type``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers.cache_utils import Cache

from ..config_weights import ShapeFact, check_integer_fields, check_shapes, load_pretrained_checked
from ..errors import UserError
from ..target import TargetAdapter, TargetLoadError, _check_safetensors_file, header_shapes, read_model_config
from ..targets.inputs import VisualLayout
from ..utils.atomic import atomic_directory, check_replaceable, interrupted_writes

__all__ = [
    "DraftModel",
    "DrafterLoadError",
    "DrafterMismatchError",
    "DrafterOutput",
    "check_export_path",
    "drafter_class",
    "known_drafter_types",
    "load_drafter",
    "read_drafter_config",
    "register_drafter",
    "save_atomically",
]

#: The values ``image_rows`` may take (what the drafter reads at image rows, token side).
IMAGE_ROWS = ("visual", "placeholder")


class DrafterMismatchError(UserError):
    """The drafter was trained for a different target (hidden size, vocabulary or fingerprint differ)."""


class DrafterLoadError(UserError):
    """A drafter directory cannot be loaded; the message names the offending file and the fix."""


@dataclass
class DrafterOutput:
    """``hidden``: ``[B, T, H]`` per row, fed back as the next row's feature when drafting deeper (EAGLE-2: the
    predicted next target feature, logits = target ``lm_head(hidden)``; EAGLE-3: the pre-norm layer output, logits
    = the drafter's own head on ``norm(hidden)``). ``past_key_values``: the draft KV cache (updated in place)."""

    hidden: torch.Tensor
    past_key_values: Cache | None = None


# model_type -> drafter class, filled by @register_drafter.
_DRAFTERS: dict[str, type[DraftModel]] = {}


def register_drafter(cls: type[DraftModel]) -> type[DraftModel]:
    """Class decorator: make ``cls`` (a :class:`DraftModel` whose ``config_class`` has a ``model_type``) loadable by
    :func:`load_drafter`, trainable with ``drafter.model_type=<model_type>``, and known to ``AutoModel``."""
    model_type = cls.config_class.model_type
    if not model_type:
        raise TypeError(f"{cls.__name__}.config_class has no model_type")
    _DRAFTERS[model_type] = cls
    AutoConfig.register(model_type, cls.config_class, exist_ok=True)
    AutoModel.register(cls.config_class, cls, exist_ok=True)
    return cls


def _ensure_registered() -> None:
    # The built-in types register on import; importing them here keeps load_drafter usable from this module alone.
    from . import eagle, eagle3  # noqa: F401


def known_drafter_types() -> list[str]:
    """The ``model_type`` values a drafter directory may have."""
    _ensure_registered()
    return sorted(_DRAFTERS)


def drafter_class(model_type: str, where: str = "drafter.model_type") -> type[DraftModel]:
    """The registered class for ``model_type``; :class:`DrafterLoadError` listing the known types otherwise."""
    _ensure_registered()
    cls = _DRAFTERS.get(model_type)
    if cls is None:
        raise DrafterLoadError(
            f"{where} is {model_type!r}, which is not a known drafter type; known types: {', '.join(sorted(_DRAFTERS))}"
        )
    return cls


class DraftModel(PreTrainedModel):
    """Base class of all drafters (see the module docstring for the protocol). Subclasses set ``config_class`` and
    implement ``__init__`` / ``forward`` / ``new_cache``; the defaults here fit EAGLE-2 style drafters that read the
    target's final hidden state and share its LM head."""

    main_input_name = "token_embeds"
    #: Does ``hidden`` regress the target's final feature (EAGLE-2's SmoothL1 term applies)?
    feature_regression: ClassVar[bool] = True
    #: Extra ``conf/drafter`` keys this type takes, passed to ``config_class.from_target`` (``None`` = target's).
    config_keys: ClassVar[tuple[str, ...]] = ()
    #: config.json sizes its weights pin down (checked before loading; see specvlm_lit.config_weights).
    shape_facts: ClassVar[tuple[ShapeFact, ...]] = ()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """transformers' generic init, then the compressors' own init (conv = average pooling, zero residuals).

        Done here rather than in ``_init_weights``: for custom-code models transformers skips modules without
        parameters of their own (e.g. ``ConvCompressor``, whose weights live in a child ``Conv2d``), so a per-module
        hook would never run for them. The hooks use ``transformers.initialization``, which leaves tensors loaded from
        a checkpoint untouched, so this is also correct inside ``from_pretrained``.
        """
        super().initialize_weights()
        for module in self.modules():
            reset = getattr(module, "_reset_compressor_parameters", None)
            if callable(reset):
                reset()

    # --------------------------------------------------------------------------------------------- protocol
    @property
    def hidden_layers(self) -> tuple[int, ...]:
        """Target layer ids whose inputs :meth:`project_features` reads (``()``: the final hidden state only)."""
        return ()

    @property
    def image_rows(self) -> str:
        """What the token side of image rows holds: ``"visual"`` (the target's visual embeddings) or
        ``"placeholder"`` (the image token's own embedding)."""
        return getattr(self.config, "image_rows", "visual") or "visual"

    def project_features(self, target_output) -> torch.Tensor:
        """``[B, T, H]`` feature rows ``f_t`` from a :class:`~specvlm_lit.target.TargetOutput`."""
        return target_output.hidden

    def token_embeds(self, target: TargetAdapter, input_ids: torch.Tensor, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """Token-side rows for ``input_ids`` given the target's ``inputs_embeds`` (visual embeddings scattered in)."""
        if self.image_rows == "placeholder":
            return target.embed_tokens(input_ids.to(target.device)).to(inputs_embeds.dtype)
        return inputs_embeds

    @property
    def draft_vocab(self) -> torch.Tensor | None:
        """Target token ids of the draft vocabulary, ascending (``None``: the whole target vocabulary)."""
        return None

    def head_logits(self, hidden: torch.Tensor, target: TargetAdapter) -> torch.Tensor:
        """Logits over the draft vocabulary ``[..., Vd]`` (default: the target's frozen LM head)."""
        return target.lm_head(hidden.to(target.device, target.dtype))

    def draft_logprobs(self, hidden: torch.Tensor, target: TargetAdapter) -> torch.Tensor:
        """float32 log-probs over the *target* vocabulary ``[..., V]``; ``-inf`` outside the draft vocabulary."""
        logprobs = torch.log_softmax(self.head_logits(hidden, target).float(), dim=-1)
        vocab = self.draft_vocab
        if vocab is None:
            return logprobs
        full = logprobs.new_full((*logprobs.shape[:-1], int(target.vocab_size)), float("-inf"))
        return full.index_copy_(-1, vocab.to(full.device), logprobs)

    def num_visual_tokens(self, layout: VisualLayout) -> int:
        """Visual rows this drafter sees for a visual laid out as ``layout`` (a
        :class:`~specvlm_lit.targets.VisualLayout`; all its tokens without a compressor)."""
        if getattr(self, "compressor", None) is None:
            return layout.num_tokens
        return self.compressor.num_output_tokens(layout)

    # ---------------------------------------------------------------------------------------------- targets
    def check_target(self, target: TargetAdapter) -> None:
        """Raise :class:`DrafterMismatchError` unless this drafter was trained for ``target``.

        Checks hidden size and vocabulary (hard requirements: shared embedding / LM head) and, when the config stores
        one, the target fingerprint (same embedding / LM-head weights; catches a drafter trained for another
        checkpoint of the same architecture, which would run but accept almost nothing).
        """
        cfg = self.config
        fix = (
            f"train a drafter for this target with {type(cfg).__name__}.from_target(target) (the drafter training "
            f"recipe does this), or load the drafter exported for this target"
        )
        trained_for = f" (trained for {cfg.target_name_or_path})" if cfg.target_name_or_path else ""
        if int(target.hidden_size) != int(cfg.hidden_size):
            raise DrafterMismatchError(
                f"drafter has hidden size {cfg.hidden_size}{trained_for} but the target has {target.hidden_size}: {fix}"
            )
        if cfg.vocab_size is not None and int(target.vocab_size) != int(cfg.vocab_size):
            if cfg.target_fingerprint and cfg.target_fingerprint == target.fingerprint():
                # Trained for this very target (the fingerprint covers its vocabulary): the file was edited.
                source = getattr(self, "name_or_path", None)
                where = f"{Path(source) / 'config.json'}: " if source else ""
                raise DrafterLoadError(
                    f"{where}vocab_size is {cfg.vocab_size} but the drafter's target_fingerprint says it was trained "
                    f"for this target, whose vocabulary has {target.vocab_size} rows. Fix: set vocab_size to "
                    f"{target.vocab_size}, or re-export the drafter"
                )
            raise DrafterMismatchError(
                f"drafter has vocabulary size {cfg.vocab_size}{trained_for} but the target has "
                f"{target.vocab_size}: {fix}"
            )
        layers = self.hidden_layers
        if layers and max(layers) >= int(target.num_layers):
            raise DrafterMismatchError(
                f"drafter reads target layers {list(layers)}{trained_for} but the target has only "
                f"{target.num_layers} decoder layers: {fix}"
            )
        if cfg.target_fingerprint:
            actual = target.fingerprint()
            if actual != cfg.target_fingerprint:
                raise DrafterMismatchError(
                    f"drafter was trained for target fingerprint {cfg.target_fingerprint}{trained_for} but this "
                    f"target's fingerprint is {actual} (different embedding / LM-head weights): {fix}"
                )

    @classmethod
    def check_config_keys(cls, given: Mapping[str, Any]) -> dict:
        """The type-specific ``conf/drafter`` keys of ``given``; unknown ones raise (listing the valid keys)."""
        unknown = sorted(set(given) - set(cls.config_keys))
        if unknown:
            raise DrafterLoadError(
                f"drafter: unknown key(s) {unknown} for model_type {cls.config_class.model_type!r}; its own keys are "
                f"{sorted(cls.config_keys)}"
            )
        return dict(given)

    @classmethod
    def for_target(cls, target: TargetAdapter, **config_overrides) -> DraftModel:
        """A freshly initialised drafter for ``target`` (``config_class.from_target`` + overrides)."""
        return cls(cls.config_class.from_target(target, **config_overrides))

    # ------------------------------------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        target: TargetAdapter | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
    ) -> DraftModel:
        """Load an exported drafter directory (local only) and, with ``target``, :meth:`check_target` it.

        The directory is validated first (missing / half-written exports, truncated safetensors) so every such
        problem raises :class:`DrafterLoadError` naming the file; weights missing from or unexpected in the file are
        an error too (they would be silently random-initialised / ignored). Called on the base class (or through
        :func:`load_drafter`) it dispatches on ``config.json``'s ``model_type``.
        """
        path = Path(path).expanduser()
        config = _check_drafter_dir(path, None if cls is DraftModel else cls)
        klass = drafter_class(config["model_type"], f"{path / 'config.json'}: model_type")
        if cls is not DraftModel and not issubclass(klass, cls):
            raise DrafterLoadError(
                f"{path / 'config.json'} has model_type={config['model_type']!r}, expected "
                f"{cls.config_class.model_type!r}: use load_drafter({str(path)!r}) to load any drafter type"
            )
        model, info = load_pretrained_checked(
            klass,
            path,
            DrafterLoadError,
            f"Fix the field of {path / 'config.json'} this names, or re-export the drafter with "
            f"save_atomically(drafter, '{path}').",
            **({} if dtype is None else {"dtype": dtype}),
        )
        missing = sorted(info.get("missing_keys") or ())
        unexpected = sorted(info.get("unexpected_keys") or ())
        if missing or unexpected:
            keys = missing + unexpected
            field = "compressor" if all(k.startswith("compressor.") for k in keys) else None
            field = field or ("final_norm" if all(k.startswith("norm.") for k in keys) else None)
            cause = f"config.json's {field} was edited" if field else "config.json was edited?"
            raise DrafterLoadError(
                f"the weights in {path} do not match {path / 'config.json'}: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]} ({cause}). Re-export the drafter, or restore config.json."
            )
        if device is not None:
            model.to(device)
        if target is not None:
            model.check_target(target)
        return model.eval()


def load_drafter(
    path: str | os.PathLike,
    target: TargetAdapter | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> DraftModel:
    """Load any exported drafter directory: the class is chosen by ``config.json``'s ``model_type`` (an unknown type
    is an error listing the known ones). See :meth:`DraftModel.load`."""
    return DraftModel.load(path, target=target, dtype=dtype, device=device)


# ------------------------------------------------------------------------------------------- files on disk
WEIGHTS = "model.safetensors"
_EXPORT_KIND = "drafter"  # what atomic_directory's marker file says an export directory holds


def read_drafter_config(path: str | os.PathLike) -> dict:
    """config.json of a drafter directory, validated (:class:`DrafterLoadError` naming the file otherwise)."""
    return _check_drafter_dir(Path(path).expanduser(), None)


def _check_drafter_dir(path: Path, expected: type[DraftModel] | None) -> dict:
    """Validate an exported drafter directory; return its parsed config.json. Raises :class:`DrafterLoadError`."""
    fix = f"Re-export it with save_atomically(drafter, '{path}')."
    if not path.is_dir():
        hint = ""
        leftovers = interrupted_writes(path)
        if leftovers:
            hint = f" (found {leftovers[0].name}: an interrupted export; it is incomplete and was never published)"
        raise DrafterLoadError(f"drafter directory {path} does not exist{hint}. {fix}")
    config_file = path / "config.json"
    config = read_model_config(
        config_file,
        DrafterLoadError,
        missing=f"{path} is not a complete drafter export (half-written or wrong directory). {fix}",
        fix=fix,
    )
    _ensure_registered()
    model_type = config["model_type"]
    if model_type not in _DRAFTERS:
        wanted = expected.config_class.model_type if expected is not None else None
        detail = f"expected {wanted!r}" if wanted else f"known drafter types: {', '.join(sorted(_DRAFTERS))}"
        hint = ""
        if "speculators_model_type" in config or "LlamaForCausalLMEagle3" in (config.get("architectures") or []):
            hint = " It is a serving-format checkpoint: import it with `python -m specvlm_lit.export import ...`."
        raise DrafterLoadError(
            f"{config_file} has model_type={model_type!r}, {detail}: {path} is not a drafter export of a known "
            f"type.{hint}"
        )
    klass = _DRAFTERS[model_type]
    weights = path / WEIGHTS
    if not weights.is_file():
        raise DrafterLoadError(f"{weights} is missing (half-written export?). {fix}")
    try:
        header = _check_safetensors_file(weights)
    except TargetLoadError as e:
        raise DrafterLoadError(str(e)) from e
    _check_config_against_weights(klass, config_file, config, header_shapes(header))
    return config


def _check_config_against_weights(klass, config_file: Path, config: dict, shapes: dict) -> None:
    """:class:`DrafterLoadError` naming the field when config.json's sizes do not fit the weights. Checked on the
    JSON itself (a missing key takes the config class's default, as loading would), because building the config can
    already fail on a wrong size (a compressor that does not divide ``hidden_size``)."""
    fix = "restore config.json (or re-export the drafter)."
    check_integer_fields(config_file, config, klass.shape_facts, DrafterLoadError, fix)

    def value(field: str):
        return config.get(field, getattr(klass.config_class, field, None))

    check_shapes(config_file, config, value, shapes, klass.shape_facts, DrafterLoadError, fix)


def _is_drafter_export(path: Path) -> bool:
    """Whether ``path`` is a drafter export written before exports carried the publisher's marker file."""
    try:
        config = read_model_config(path / "config.json", DrafterLoadError, missing="", fix="")
    except DrafterLoadError:
        return False
    _ensure_registered()
    return config["model_type"] in _DRAFTERS


def check_export_path(path: str | os.PathLike) -> None:
    """Raise :class:`~specvlm_lit.utils.atomic.ForeignDirectoryError` unless :func:`save_atomically` may write
    ``path`` (absent, empty, or a drafter export); lets a caller fail before training instead of after it."""
    check_replaceable(path, _EXPORT_KIND, published_before=_is_drafter_export)


def save_atomically(drafter: DraftModel, path: str | os.PathLike, **save_kwargs) -> Path:
    """Export ``drafter`` to ``path`` so that ``path`` is either the old export or the complete, validated new one.

    Built on :func:`~specvlm_lit.utils.atomic.atomic_directory`: ``save_pretrained`` writes into a hidden temp dir next
    to ``path``, which is validated and then renamed to ``path``. An existing ``path`` is replaced only if it is
    empty or a drafter export; anything else raises :class:`~specvlm_lit.utils.atomic.ForeignDirectoryError` and is
    left untouched.
    """
    path = Path(path).expanduser().absolute()
    with atomic_directory(path, _EXPORT_KIND, published_before=_is_drafter_export) as tmp:
        drafter.save_pretrained(str(tmp), **save_kwargs)
        _check_drafter_dir(tmp, type(drafter))
    return path
