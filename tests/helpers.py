"""Helpers shared by several test files: hand-written shards and the chi-square goodness-of-fit pieces."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Mapping
from pathlib import Path

import torch


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """A tar shard holding ``<key>.<ext>`` members in the given order (webdataset's layout); returns ``path``."""
    with tarfile.open(path, "w") as tf:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def pooled_cells(counts: Mapping, law: Mapping, min_expected: float) -> tuple[list[float], list[float]]:
    """(observed, expected) chi-square cells of ``counts`` against ``law`` (outcome -> probability).

    An outcome expected at least ``min_expected`` times keeps its own cell; everything else (rarer outcomes, outcomes
    outside ``law``, the mass ``law`` leaves out) shares one cell, merged into the smallest kept cell when it is
    expected fewer than ``min_expected`` times: small cells give the statistic a heavier tail than chi-square.
    """
    n = sum(counts.values())
    obs, exp = [], []
    for key, p in law.items():
        if p * n >= min_expected:
            obs.append(counts.get(key, 0))
            exp.append(p * n)
    rest_o, rest_e = n - sum(obs), max(n - sum(exp), 0.0)
    if rest_e >= min_expected:
        obs.append(rest_o)
        exp.append(rest_e)
    elif obs:
        j = min(range(len(exp)), key=exp.__getitem__)
        obs[j] += rest_o
        exp[j] += rest_e
    return obs, exp


def chi2_pvalue_of_cells(obs, exp) -> float:
    """Pearson chi-square p-value (upper tail of chi2 with cells - 1 degrees of freedom); 1 with fewer than 2 cells."""
    dof = len(obs) - 1
    if dof < 1:
        return 1.0
    stat = sum((float(o) - float(e)) ** 2 / float(e) for o, e in zip(obs, exp, strict=True))
    return float(
        torch.special.gammaincc(
            torch.tensor(dof / 2.0, dtype=torch.float64), torch.tensor(stat / 2.0, dtype=torch.float64)
        )
    )


def tree_from_parents(parents: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference ancestor-or-self mask ``[n, n]`` and depths ``[n]`` of a tree given by parent indices (-1 = root),
    built node by node (independently of the decoder's own tree code)."""
    n = len(parents)
    mask = torch.zeros(n, n, dtype=torch.bool)
    depth = torch.zeros(n, dtype=torch.long)
    for i, p in enumerate(parents):
        mask[i, i] = True
        if p >= 0:
            mask[i] |= mask[p]
            depth[i] = depth[p] + 1
    return mask, depth


def root_path(parents: list[int], node: int) -> list[int]:
    """Node indices from the root to ``node``."""
    out = []
    while node >= 0:
        out.append(node)
        node = parents[node]
    return out[::-1]
