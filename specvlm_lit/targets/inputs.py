"""The objects every family adapter exchanges with callers: processor outputs in, encoded visuals and layouts out.

Families differ in what their processor emits beside ``input_ids``: LLaVA-NeXT / OneVision need ``image_sizes`` (the
original size picks the AnyRes tiling), OneVision ``batch_num_images`` (multi-image prompts are not tiled), the
Qwen-VL families ``image_grid_thw`` (their ``pixel_values`` are flattened patches, not images). :class:`VisualInputs`
carries all of them as one object, so shards, collate and decoding pass one thing along and only the family adapter
reads the fields. :class:`EncodedImages` is what ``adapter.encode_images`` returns: a plain list of ``[n_i, H]``
per-image features (so generic code that only embeds keeps working) that also remembers the facts the family's
decoder still needs (Qwen: the grids for mRoPE positions; Qwen3-VL: the DeepStack features).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace

import torch

__all__ = ["EncodedImages", "GridPiece", "PromptInputs", "VisualInputs", "VisualLayout"]


@dataclass
class VisualInputs:
    """A prompt's image and video inputs as the family's processors produced them (``None`` = the family has no such
    field, or the prompt no such input). ``pixel_values``: LLaVA-NeXT / OneVision ``[N, tiles, 3, h, w]``; Qwen-VL
    ``[patches, C*t*p*p]``; Mistral 3 ``[N, 3, h, w]`` (zero-padded to the largest image). ``pixel_values_videos``:
    Qwen-VL flattened patches like images; OneVision ``[V, frames, 3, S, S]``."""

    pixel_values: torch.Tensor | None = None
    image_sizes: torch.Tensor | None = None  # [N, 2] (height, width): original (AnyRes), as resized (Mistral 3)
    image_grid_thw: torch.Tensor | None = None  # [N, 3] patch grid (t, h, w) before merging, Qwen-VL families
    batch_num_images: torch.Tensor | None = None  # [B] images per sample, LLaVA-OneVision
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None  # [V, 3] (temporal patches, h, w) before merging, Qwen-VL families
    second_per_grid_ts: torch.Tensor | None = None  # [V] seconds per temporal patch, Qwen2.5-VL (mRoPE spacing)
    # Not model inputs: the kind ("image" / "video") of every visual in prompt order (None: images, then videos), and
    # Qwen3-VL's frame times in seconds, one per temporal patch of each video (its prompt text, see qwen_vl.py; a
    # None entry: that video has none, the family's default applies).
    order: tuple[str, ...] | None = None
    video_timestamps: list[list[float] | None] | None = None

    _FIELDS = ("pixel_values", "image_sizes", "image_grid_thw", "batch_num_images")
    _VIDEO_FIELDS = ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")

    @classmethod
    def from_processor(cls, outputs: Mapping) -> VisualInputs | None:
        """The visual fields of a processor's ``BatchFeature`` / dict; ``None`` when it holds no images or videos."""
        if outputs.get("pixel_values") is None and outputs.get("pixel_values_videos") is None:
            return None
        return cls(**{name: _as_tensor(outputs.get(name)) for name in cls._FIELDS + cls._VIDEO_FIELDS})

    @property
    def kinds(self) -> tuple[str, ...]:
        """``"image"`` / ``"video"`` for every visual, in the order their tokens appear in the prompt (the order of
        :meth:`FamilyAdapter.encode_images`'s features and of ``layouts_of``'s runs)."""
        if self.order is not None:
            return self.order
        return ("image",) * self.count("image") + ("video",) * self.count("video")

    def count(self, kind: str) -> int:
        """How many images (``kind="image"``) or videos (``"video"``) these inputs hold."""
        if kind == "image":
            grid, pixels = self.image_grid_thw, self.pixel_values
        else:
            grid, pixels = self.video_grid_thw, self.pixel_values_videos
        if pixels is None:
            return 0
        if grid is not None:
            return int(grid.shape[0])
        if kind == "image" and self.image_sizes is not None:
            return int(self.image_sizes.shape[0])
        return int(pixels.shape[0])

    @classmethod
    def concat(cls, items: list[VisualInputs]) -> VisualInputs:
        """One batch's visual inputs from its samples' (in sample order), laid out as the HF processor lays out a
        batch: per-image / per-video fields concatenated; image ``pixel_values`` zero-padded at the end of every
        dimension to the batch's largest: AnyRes ``[N, tiles, 3, h, w]`` to the largest tile count, Pixtral
        ``[N, 3, h, w]`` to the largest height and width (the model slices each image back out by its
        ``image_sizes``). Flattened patches (Qwen, 2-D) are only concatenated."""
        if not items:
            raise ValueError("VisualInputs.concat needs at least one item")
        pixels = [item.pixel_values for item in items if item.pixel_values is not None]
        if pixels and pixels[0].dim() > 2:
            most = [max(p.shape[d] for p in pixels) for d in range(pixels[0].dim())]
            pixels = [
                torch.nn.functional.pad(p, [x for d in reversed(range(1, p.dim())) for x in (0, most[d] - p.shape[d])])
                for p in pixels
            ]
        merged = {"pixel_values": torch.cat(pixels, 0) if pixels else None}
        for group, present in ((cls._FIELDS[1:], "pixel_values"), (cls._VIDEO_FIELDS, "pixel_values_videos")):
            holders = [item for item in items if getattr(item, present) is not None]
            for name in group:
                values = [getattr(item, name) for item in holders]
                if name == "batch_num_images" and any(v is not None for v in values):
                    # a sample without images still has its entry (0 images) in the batch
                    values = [
                        item.batch_num_images if item.pixel_values is not None else torch.tensor([0]) for item in items
                    ]
                if any(v is None for v in values) and not all(v is None for v in values):
                    raise ValueError(f"VisualInputs.concat: {name} is set on some samples only")
                merged[name] = None if not values or values[0] is None else torch.cat(values, 0)
        if any(item.order is not None for item in items):
            merged["order"] = tuple(kind for item in items for kind in item.kinds)
        with_videos = [item for item in items if item.count("video")]
        if any(item.video_timestamps is not None for item in with_videos):  # a batch may mix timed and untimed clips
            merged["video_timestamps"] = [
                ts for item in with_videos for ts in (item.video_timestamps or [None] * item.count("video"))
            ]
        return cls(**merged)

    def hf_kwargs(self) -> dict[str, torch.Tensor]:
        """The non-empty model inputs as keyword arguments of the HF model's ``forward`` / ``generate``."""
        return {
            name: getattr(self, name) for name in self._FIELDS + self._VIDEO_FIELDS if getattr(self, name) is not None
        }

    def to(self, device=None, dtype=None) -> VisualInputs:
        """A copy on ``device``; ``dtype`` applies to the pixel tensors only (the other fields keep theirs)."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in moved.items()}
        if dtype is not None:
            for name in ("pixel_values", "pixel_values_videos"):
                if moved[name] is not None:
                    moved[name] = moved[name].to(dtype)
        return replace(self, **moved)

    def _rows(self, kind: str, start: int, stop: int) -> dict:
        """The fields of images (or videos) ``start:stop``."""
        names = self._FIELDS[:3] if kind == "image" else self._VIDEO_FIELDS
        pixels, grid = getattr(self, names[0]), getattr(self, names[2] if kind == "image" else names[1])
        if pixels is None or start == stop:
            return {}
        if grid is not None:  # flattened patches: each visual owns t * h * w rows
            rows = grid.prod(-1).tolist()
            out = {names[0]: pixels[sum(rows[:start]) : sum(rows[:stop])]}
        else:
            out = {names[0]: pixels[start:stop]}
        for name in names[1:]:
            value = getattr(self, name)
            out[name] = None if value is None else value[start:stop]
        return out

    def sample(self, index: int, counts: list[int]) -> VisualInputs | None:
        """Sample ``index``'s visuals of a batch whose samples hold ``counts`` visuals (images and videos) each
        (``None``: it has none)."""
        start, n = sum(counts[:index]), counts[index]
        if n == 0:
            return None
        kinds = self.kinds
        mine = kinds[start : start + n]
        first = {kind: kinds[:start].count(kind) for kind in ("image", "video")}
        out = {}
        for kind in ("image", "video"):
            out.update(self._rows(kind, first[kind], first[kind] + mine.count(kind)))
        n_images = mine.count("image")
        if self.batch_num_images is not None and n_images:
            out["batch_num_images"] = torch.tensor([n_images])
        if self.video_timestamps is not None:
            out["video_timestamps"] = self.video_timestamps[first["video"] : first["video"] + mine.count("video")]
        return VisualInputs(**out, order=None if self.order is None else mine)

    @property
    def num_images(self) -> int:
        """How many visuals (images and videos: one feature tensor each in ``encode_images``) these inputs hold."""
        return len(self.kinds)


def _as_tensor(value):
    if value is None or isinstance(value, torch.Tensor):
        return value
    return torch.as_tensor(value)


class EncodedImages(list):
    """LM-space visual features, one ``[n_i, H]`` tensor per image or video in prompt order (a ``list``), plus what
    the family's decoder still needs: ``image_grid_thw`` / ``video_grid_thw`` / ``second_per_grid_ts`` (Qwen-VL
    mRoPE positions) and ``deepstack`` (Qwen3-VL: one list of per-visual features per DeepStack layer, added to the
    hidden states of the first decoder layers)."""

    _GRIDS = ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")

    def __init__(
        self,
        features,
        image_grid_thw: torch.Tensor | None = None,
        deepstack=None,
        video_grid_thw: torch.Tensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
    ):
        super().__init__(features)
        self.image_grid_thw = image_grid_thw
        self.deepstack = deepstack
        self.video_grid_thw = video_grid_thw
        self.second_per_grid_ts = second_per_grid_ts

    @classmethod
    def interleave(cls, images: EncodedImages, videos: EncodedImages, visual) -> EncodedImages:
        """Image and video features merged into the prompt order of ``visual`` (a :class:`VisualInputs`: its
        ``kinds`` and grids), DeepStack layers likewise."""
        sources = {"image": iter(range(len(images))), "video": iter(range(len(videos)))}
        picks = [(kind, next(sources[kind])) for kind in visual.kinds]
        parts = {"image": images, "video": videos}
        deep = None
        if images.deepstack is not None or videos.deepstack is not None:
            layers = len(images.deepstack or videos.deepstack)
            deep = [[parts[k].deepstack[layer][i] for k, i in picks] for layer in range(layers)]
        return cls(
            [parts[k][i] for k, i in picks],
            image_grid_thw=visual.image_grid_thw,
            deepstack=deep,
            video_grid_thw=visual.video_grid_thw,
            second_per_grid_ts=visual.second_per_grid_ts,
        )

    @classmethod
    def join(cls, parts) -> list:
        """One batch's features from its samples' (in sample order), keeping the grids / DeepStack features that
        :class:`EncodedImages` parts carry (a plain list of tensors when none does)."""
        flat = [t for part in parts for t in part]
        grids = {
            name: [getattr(p, name) for p in parts if len(p) and getattr(p, name, None) is not None]
            for name in cls._GRIDS
        }
        if not any(grids.values()):
            return flat
        deep = [p.deepstack for p in parts if len(p) and getattr(p, "deepstack", None) is not None]
        layers = [sum((d[i] for d in deep), []) for i in range(len(deep[0]))] if deep else None
        return cls(flat, deepstack=layers, **{name: torch.cat(v, 0) if v else None for name, v in grids.items()})


@dataclass
class VisualLayout:
    """How one image's placeholder tokens are laid out (row-major), for compressors and the draft sequence.

    ``segments``: consecutive blocks, each ``(kind, rows, cols)``:

    * ``"grid"``: a plain ``rows x cols`` patch grid;
    * ``"tiles"``: AnyRes, the unpadded tile grid with one ``image_newline`` token after each row, so it spans
      ``rows * (cols + 1)`` tokens;
    * ``"merged"``: Qwen's ``spatial_merge_size``-merged patches (a video: ``frames`` temporal patches of ``rows x
      cols`` each), or OneVision's 2x2-pooled video frames (``frames`` frames);
    * ``"cls"`` / ``"newline"``: single tokens outside any grid (the CLS row of LLaVA's ``full`` feature strategy,
      the one trailing ``image_newline`` of a LLaVA-NeXT base-only image); ``rows = cols = 1``.

    ``num_tokens`` is the total.
    """

    segments: list[tuple[str, int, int]]
    frames: int = 1

    # Kinds whose tokens form patch grids (pieces); every other kind is single tokens outside any grid.
    _GRID_KINDS = ("grid", "tiles", "merged")

    def _span(self, kind: str, rows: int, cols: int) -> int:
        """How many placeholder tokens one segment occupies."""
        if kind == "tiles":
            return rows * (cols + 1)
        return rows * cols * (self.frames if kind == "merged" else 1)

    @property
    def num_tokens(self) -> int:
        return sum(self._span(*segment) for segment in self.segments)

    @property
    def grid(self) -> tuple[int, int] | None:
        """(rows, cols) when the tokens are exactly one plain grid (what grid compressors assume), else ``None``."""
        if len(self.segments) == 1 and self.frames == 1 and self.segments[0][0] in ("grid", "merged"):
            return self.segments[0][1], self.segments[0][2]
        return None

    def pieces(self) -> list[GridPiece]:
        """The layout as plain patch grids, in token order: each ``"grid"`` segment, the unpadded AnyRes tile grid
        without its newline tokens, each frame of a ``"merged"`` segment. ``index`` are the grid's tokens, row-major,
        as offsets into this image's run of placeholder tokens; tokens in no piece (AnyRes newlines, CLS) are
        :meth:`extra_indices`. Grid compressors (pool, conv) work piece by piece."""
        out, at = [], 0
        for kind, rows, cols in self.segments:
            if kind == "tiles":
                index = (torch.arange(rows)[:, None] * (cols + 1) + torch.arange(cols)[None, :]).flatten() + at
                out.append(GridPiece(index, rows, cols))
            elif kind in self._GRID_KINDS:
                for frame in range(self.frames if kind == "merged" else 1):
                    first = at + frame * rows * cols
                    out.append(GridPiece(torch.arange(first, first + rows * cols), rows, cols))
            at += self._span(kind, rows, cols)
        return out

    def extra_indices(self) -> torch.Tensor:
        """Offsets of the tokens no grid piece holds (AnyRes ``image_newline`` tokens, CLS), ascending."""
        covered = torch.zeros(self.num_tokens, dtype=torch.bool)
        for piece in self.pieces():
            covered[piece.index] = True
        return (~covered).nonzero().flatten()


@dataclass
class GridPiece:
    """One plain patch grid inside an image's placeholder tokens (see :meth:`VisualLayout.pieces`)."""

    index: torch.Tensor  # [rows * cols] long: offsets into the image's run of tokens, row-major
    rows: int
    cols: int


@dataclass
class PromptInputs:
    """A rendered prompt: ``input_ids`` ``[1, T]`` with every image placeholder expanded, the processor outputs the
    images need (``visual``), and for training conversations the assistant-only ``loss_mask`` ``[1, T]`` (True on
    the tokens the model must learn to produce: assistant turns and their end-of-turn tokens)."""

    input_ids: torch.Tensor
    visual: VisualInputs | None = None
    loss_mask: torch.Tensor | None = None
    layouts: list[VisualLayout] = field(default_factory=list)
    text: str = ""
    # (width, height) of each image as handed to the image processor / as encoded; empty = as given (the family's
    # processor resizes by itself and the layouts say what came out).
    input_sizes: list[tuple[int, int]] = field(default_factory=list)
    encoded_sizes: list[tuple[int, int]] = field(default_factory=list)
    truncated: bool = False  # a training conversation cut at max_length

    @property
    def num_visual_tokens(self) -> int:
        return sum(layout.num_tokens for layout in self.layouts)

    @property
    def grid(self) -> tuple[int, int] | None:
        """The plain patch grid of the prompt's only image (what grid compressors use), else ``None``."""
        return self.layouts[0].grid if len(self.layouts) == 1 else None

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.ones_like(self.input_ids)
