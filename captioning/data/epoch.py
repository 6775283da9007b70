"""The epoch plan: who reads what, computed from sizes.json alone, identically on every rank.

    plan = plan_epoch(split_sizes(read_sizes("data/shards"), "train"), train=True, batch_size=32,
                      num_workers=2, world_size=2, seed=0, epoch=3)
    plan = plan_epoch(read_split_sizes("data/shards-new", "train", extra=["data/shards"]), ...)  # both
    plan.streams[plan.stream_index(rank, worker)]   # the shard ranges that (rank, worker) reads
    plan.batches_for_rank(rank)                      # the same on every rank in training

- Train: shards are shuffled with ``(seed, epoch)``, laid end to end, and the N samples are cut
  into S = world_size x max(num_workers, 1) contiguous runs of N // S or N // S + 1 samples; a
  shard may be shared by neighbouring streams (a later one reads past the earlier ones' samples
  without decoding them). Stream ``rank * W + worker`` reads run number ``rank * W + worker``. Every
  stream yields exactly K = ceil(ceil(N / S) / B) full batches, padding its tail with copies of its
  own last samples (``is_pad=True``), so every rank yields W * K batches without communication,
  every sample appears exactly once among non-padding entries, and the total padding S*K*B - N is
  less than S*B. Training needs at least S non-empty shards (STYLE habit 9).
- Eval (``train=False``): the same cut without shuffle or padding: every image exactly once over
  all ranks, in a fixed order; ranks may yield different numbers of batches (one fewer at most
  per worker), so evaluation runs no collective per step and gathers its results with
  ``all_gather_object`` at the end. Fewer shards than streams is fine here (runs share shards).

Pure and cheap: no shard is opened, no process communicates. ``captioning.data.loader`` runs the plan.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ShardRange:
    """``take`` consecutive samples of shard ``name``, after skipping its first ``skip``."""

    name: str
    skip: int
    take: int


@dataclass(frozen=True)
class EpochPlan:
    """Who reads what in one epoch: one tuple of shard ranges per (rank, worker) stream.

    Stream ``rank * workers_per_rank + worker`` belongs to that rank's DataLoader worker.
    ``batches_per_stream`` is what each stream yields: K for every stream in training (padded),
    ceil(samples / B) in evaluation.
    """

    train: bool
    world_size: int
    workers_per_rank: int
    batch_size: int
    shard_order: tuple[str, ...]
    streams: tuple[tuple[ShardRange, ...], ...]
    samples_per_stream: tuple[int, ...]
    batches_per_stream: tuple[int, ...]

    @property
    def num_streams(self) -> int:
        return self.world_size * self.workers_per_rank

    @property
    def num_samples(self) -> int:
        """Images in the split (each exactly once per epoch among non-padding entries)."""
        return sum(self.samples_per_stream)

    def stream_index(self, rank: int, worker: int) -> int:
        return rank * self.workers_per_rank + worker

    def rank_streams(self, rank: int) -> range:
        return range(rank * self.workers_per_rank, (rank + 1) * self.workers_per_rank)

    def padding_of_stream(self, stream: int) -> int:
        """Padding images stream ``stream`` appends (0 in evaluation)."""
        if not self.train:
            return 0
        return self.batches_per_stream[stream] * self.batch_size - self.samples_per_stream[stream]

    def batches_for_rank(self, rank: int) -> int:
        return sum(self.batches_per_stream[s] for s in self.rank_streams(rank))

    def samples_for_rank(self, rank: int) -> int:
        """Non-padding images rank ``rank`` yields."""
        return sum(self.samples_per_stream[s] for s in self.rank_streams(rank))

    def padding_for_rank(self, rank: int) -> int:
        return sum(self.padding_of_stream(s) for s in self.rank_streams(rank))

    @property
    def total_padding(self) -> int:
        return sum(self.padding_of_stream(s) for s in range(self.num_streams))


def shuffle_shards(names: Sequence[str], *, seed: int, epoch: int) -> list[str]:
    """The epoch's shard order: a permutation seeded by (seed, epoch), the same on every rank."""
    order = sorted(names)
    random.Random(f"shards:{seed}:{epoch}").shuffle(order)
    return order


def plan_epoch(
    sizes: Mapping[str, int],
    *,
    train: bool,
    batch_size: int,
    num_workers: int,
    world_size: int,
    seed: int,
    epoch: int,
) -> EpochPlan:
    """Cut one split's samples into per-(rank, worker) streams (see the module doc).

    ``sizes`` maps shard names to image counts (one split of sizes.json, or of several builds read
    together: ``format.read_split_sizes`` keys the other builds' shards by their full location; names
    are opaque here). Pure and cheap: every rank calls it with the same arguments and gets the same
    plan, without communication.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0 or world_size < 1:
        raise ValueError(f"need num_workers >= 0 and world_size >= 1, got {num_workers} and {world_size}")
    workers = max(num_workers, 1)
    num_streams = world_size * workers
    nonempty = [name for name, n in sizes.items() if n > 0]
    total = sum(sizes[name] for name in nonempty)
    if total == 0:
        raise ValueError(f"the split has no samples (shards: {sorted(sizes)})")
    if train and len(nonempty) < num_streams:
        raise ValueError(
            f"too few shards: {len(nonempty)} non-empty shard(s) for {world_size} rank(s) x "
            f"{workers} loader worker(s) = {num_streams} streams; every stream needs a shard of its own. "
            f"Write more, smaller shards (lower data.shards.samples_per_shard) or use fewer workers "
            f"(data.loader.num_workers) or ranks."
        )
    order = shuffle_shards(nonempty, seed=seed, epoch=epoch) if train else sorted(nonempty)

    # Quotas differ by at most one sample; cut the concatenated shards into runs of those lengths.
    base, extra = divmod(total, num_streams)
    quotas = [base + (1 if s < extra else 0) for s in range(num_streams)]
    streams: list[tuple[ShardRange, ...]] = []
    shard_i, offset = 0, 0  # position in the concatenated order: shard index, samples used of it
    for quota in quotas:
        ranges: list[ShardRange] = []
        need = quota
        while need > 0:
            name = order[shard_i]
            take = min(need, sizes[name] - offset)
            ranges.append(ShardRange(name, offset, take))
            need -= take
            offset += take
            if offset == sizes[name]:
                shard_i, offset = shard_i + 1, 0
        streams.append(tuple(ranges))
    assert shard_i == len(order) and offset == 0, "the plan must use every sample exactly once"

    if train:
        # Every stream pads to K full batches: K*B >= max quota, and S*(K-1)*B < N, so the total
        # padding S*K*B - N is below S*B.
        k = math.ceil(math.ceil(total / num_streams) / batch_size)
        batches = [k] * num_streams
    else:
        batches = [math.ceil(q / batch_size) for q in quotas]
    return EpochPlan(
        train=train,
        world_size=world_size,
        workers_per_rank=workers,
        batch_size=batch_size,
        shard_order=tuple(order),
        streams=tuple(streams),
        samples_per_stream=tuple(quotas),
        batches_per_stream=tuple(batches),
    )
