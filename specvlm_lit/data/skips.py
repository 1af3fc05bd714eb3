"""Skip counts of the data pipeline and the rule that stops a run when too much of the data is unusable.

Samples are read in DataLoader workers; every unusable one is counted under one reason of :data:`SKIP_REASONS`
and the counts reach the training process with the batches (see ``shards.py``). A :class:`BadSampleMonitor`
per split holds them and applies the rule:

* judged from the first :attr:`BadSampleMonitor.min_seen` samples on (fewer say too little), and always at the
  end of a pass: more than ``max_bad_fraction`` unusable -> :class:`TooManyBadSamples`;
* a pass (or the first ``min_seen`` samples of an endless stream) with no usable sample -> :class:`NoUsableSamples`.

Under DDP the counts are summed over ranks (:meth:`BadSampleMonitor.sync`) at points every rank reaches together,
so every rank takes the same decision and raises together: no rank is left waiting in a collective.
"""

from __future__ import annotations

from collections import Counter

from ..errors import UserError

#: Why a sample was skipped. ``corrupt_tar`` and ``empty_shard`` count shards (a shard cut short or unreadable,
#: including the incomplete sample at the cut; a readable shard without samples), the others count samples.
SKIP_REASONS = (
    "corrupt_tar",
    "empty_shard",
    "missing_json",
    "bad_json",
    "bad_conversation",
    "no_answer",
    "missing_image",
    "corrupt_image",
    "image_too_small",
    "image_exceeds_max_length",
    "missing_video",
    "corrupt_video",
    "video_unsupported",
    "truncated_away",
)
#: Count keys that are not skips: everything read (skips included), and samples kept but truncated.
SEEN, TRUNCATED = "seen", "truncated"
COUNT_KEYS = (SEEN, TRUNCATED, *SKIP_REASONS)
#: Default of ``data.bad_fraction_min_samples``: the bad fraction is not judged on fewer samples than this.
MIN_SEEN = 32


class TooManyBadSamples(UserError):
    """More of the data is unusable than ``max_bad_fraction`` allows: the shards need fixing."""


class NoUsableSamples(TooManyBadSamples):
    """A data pass yields no usable sample at all (wrong files, or every sample malformed)."""


def describe(counts: Counter) -> str:
    """``"12 of 40 read unusable: bad_json=10, corrupt_image=2; 3 truncated"``: one line for summaries and errors."""
    if not counts[SEEN]:
        return "no sample was read"
    reasons = ", ".join(f"{k}={counts[k]}" for k in SKIP_REASONS if counts[k])
    bad = sum(counts[k] for k in SKIP_REASONS)
    text = f"{bad} of {counts[SEEN]} read unusable" + (f": {reasons}" if reasons else "")
    return text + (f"; {counts[TRUNCATED]} truncated" if counts[TRUNCATED] else "")


class BadSampleMonitor:
    """Skip counts of one split (``train`` or ``val``) over the run and over the current pass.

    ``counts`` are all ranks' totals as of the last :meth:`sync` (restored from checkpoints: they survive resume);
    this process adds what its own loader reads to ``pass_local`` (:meth:`update`), folded into ``done_local`` when
    the next pass starts (:meth:`start_pass`; a sanity-check pass is judged but not added to the totals).
    """

    def __init__(self, split: str, max_bad_fraction: float = 0.05, min_seen: int = MIN_SEEN, source: str = ""):
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise UserError(f"data.max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        if min_seen < 1:
            raise UserError(f"data.bad_fraction_min_samples must be >= 1, got {min_seen}")
        self.split, self.max_bad_fraction, self.min_seen, self.source = split, max_bad_fraction, min_seen, source
        self.restored: Counter = Counter()  # totals of the run this one resumes (all ranks)
        self.done_local: Counter = Counter()  # this process, finished passes
        self.pass_local: Counter = Counter()  # this process, the current pass
        self.counts: Counter = Counter()  # all ranks, everything: restored + done + current pass
        self.pass_counts: Counter = Counter()  # all ranks, the current pass
        self._pass_is_sanity = False
        self.distributed = False  # under DDP only sync() sets the totals (they are all ranks' sums)

    # ------------------------------------------------------------------------------------------------ counting
    def start_pass(self, sanity: bool = False) -> None:
        if not self._pass_is_sanity:
            self.done_local.update(self.pass_local)
        self.pass_local = Counter()
        self._pass_is_sanity = sanity
        if not self.distributed:
            self._refresh_local()

    def update(self, stats: dict) -> None:
        unknown = set(stats) - set(COUNT_KEYS)
        assert not unknown, f"unknown skip-count keys {unknown}: add them to SKIP_REASONS"
        self.pass_local.update(stats)
        if not self.distributed:
            self._refresh_local()

    def _refresh_local(self) -> None:
        """Single process: local counts are the totals (:meth:`sync` refreshes them under DDP)."""
        self.pass_counts = Counter(self.pass_local)
        self.counts = self.restored + self._run_local()

    def _run_local(self) -> Counter:
        return self.done_local + (Counter() if self._pass_is_sanity else self.pass_local)

    def sync(self, trainer, flag: bool = False) -> bool:
        """Sum the counts over DDP ranks into ``counts``/``pass_counts``; every rank must call it at the same point.

        ``flag`` is OR-ed over ranks too (a rank that cannot form a batch says so); returns the OR."""
        if trainer is None or trainer.world_size <= 1:
            self._refresh_local()
            return flag
        import torch

        run, now = self._run_local(), self.pass_local
        vec = [run[k] for k in COUNT_KEYS] + [now[k] for k in COUNT_KEYS] + [int(flag)]
        total = trainer.strategy.reduce(
            torch.tensor(vec, dtype=torch.float64, device=trainer.strategy.root_device), reduce_op="sum"
        )
        total = [int(round(x)) for x in total.tolist()]
        n = len(COUNT_KEYS)
        self.counts = self.restored + Counter(dict(zip(COUNT_KEYS, total[:n])))
        self.pass_counts = Counter(dict(zip(COUNT_KEYS, total[n : 2 * n])))
        return bool(total[-1])

    # ------------------------------------------------------------------------------------------------ the rule
    @property
    def reasons(self) -> Counter:
        return Counter({k: self.counts[k] for k in SKIP_REASONS if self.counts[k]})

    @property
    def bad(self) -> int:
        return sum(self.reasons.values())

    def violation(self, counts: Counter, *, end_of_pass: bool = False) -> TooManyBadSamples | None:
        """The error ``counts`` call for, if any: judged from ``min_seen`` samples on, or at the end of a pass."""
        seen = counts[SEEN]
        bad = sum(counts[k] for k in SKIP_REASONS)
        if not end_of_pass and seen < self.min_seen:
            return None
        if seen == bad:
            where = f" from data.{self.split}_urls={self.source}" if self.source else ""
            return NoUsableSamples(
                f"no usable {self.split} sample: {describe(counts)}{where}. A sample is <key>.json holding "
                f'{{"conversations": [{{"from": "human", "value": "<image>\\n..."}}, {{"from": "gpt", ...}}]}} '
                f"+ <key>.png/.jpg in a webdataset tar; fix the shards or point data.{self.split}_urls at good ones"
            )
        if bad / seen > self.max_bad_fraction:
            return TooManyBadSamples(
                f"{self.split} data: {describe(counts)}, more than data.max_bad_fraction={self.max_bad_fraction} "
                f"(judged from {self.min_seen} samples on, data.bad_fraction_min_samples); fix or remove the bad "
                f"shards, or raise data.max_bad_fraction"
            )
        return None

    def check(self, *, end_of_pass: bool = False) -> None:
        """Raise if the totals (or, at the end of a pass, that pass alone) break the rule.

        A sanity-check pass (two validation batches before training) is only checked for having a usable sample."""
        if end_of_pass and self._pass_is_sanity:
            error = self.violation(self.pass_counts, end_of_pass=True)
            if isinstance(error, NoUsableSamples):
                raise error
            return
        error = self.violation(self.counts, end_of_pass=end_of_pass)
        if error is None and end_of_pass:
            error = self.violation(self.pass_counts, end_of_pass=True)
        if error is not None:
            raise error

    # ------------------------------------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        return {k: int(v) for k, v in self.counts.items() if v}

    def load_state_dict(self, state: dict) -> None:
        self.restored = Counter({k: int(v) for k, v in state.items() if k in COUNT_KEYS})
        self._refresh_local()
