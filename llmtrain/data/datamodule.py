"""TokenDataModule: packed fixed-length sequences from token shards (or a streamed source), split over ranks
and DataLoader workers, resumable exactly.

Packing. Documents are laid back to back, each as `[BOS] tokens EOS` (BOS only with add_bos), into one packed
stream per split. Sample w is the window of seq_len + 1 tokens starting at w * seq_len: input_ids = window[:-1],
labels = window[1:]. With document_masking the batch also has document_ids (0, 1, ... within each row, a new
document starts after each EOS) and position_ids (0 at each document start and at the row start).

Order (shards). The training stream is infinite: global sample g is window perm_e(g mod n) of epoch e = g // n,
where perm_e is a seeded bijection of [0, n) evaluated per index (a Feistel network), so no permutation is
stored and any position is reached in O(1). Step s of rank r takes samples s*B*W + r*B + [0, B); the
DataLoader's workers take the rank's batches round-robin (batch j from worker j mod K), which is the order
the DataLoader yields them in. So the whole data position of every rank and every worker is one number:
`consumed_samples`, the global samples the training loop has consumed (counted in `on_before_batch_transfer`,
not when workers prefetch). It is saved in every checkpoint (`state_dict`) and a new train iterator starts
there; it stays valid if the world size changes between runs.

On the fly (data_dir None, source + tokenizer). Training documents are dealt round-robin to world_size * K
streams (K = max(1, num_workers)); each stream tokenizes its documents, packs them the same way, shuffles
windows through a seeded buffer and yields batches; rank batch g comes from the rank's stream g mod K. Resume
regenerates (tokenizes again) the batches each stream had already produced: exact, but it costs time in
proportion to the position and needs the same world size, micro batch and num_workers. For long runs,
prepare shards. The validation split is the documents `llmtrain prepare` would pick (up to VAL_TOKEN_BUDGET).
"""

from __future__ import annotations

import logging
import warnings
from bisect import bisect_right
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from llmtrain.data.shards import TOKENIZER_DIR, ShardError, ShardFile, open_split, read_metadata
from llmtrain.data.sources import Source, is_validation_document, parse_source
from llmtrain.data.tokenizer import Tokenizer, load_tokenizer
from llmtrain.data.verify import verify_folder

log = logging.getLogger(__name__)

# Lightning warns about any IterableDataset with __len__ under several workers ("could be inaccurate"). Ours
# (the validation batches) assigns each batch to exactly one worker, so its length is exact.
warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")

STATE_VERSION = 1  # version 1 states without "tokens_per_step" (older checkpoints) skip the batch check
VAL_TOKEN_BUDGET = 1 << 20  # on-the-fly mode: validation tokens collected at setup
SHUFFLE_BUFFER = 64  # on-the-fly mode: windows per stream in the seeded shuffle buffer


# ----------------------------------------------------------------------------------------------------------
# order: a seeded permutation evaluated per index

_MASK64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on a uint64 array (products wrap mod 2^64)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class WindowPermutation:
    """A seeded bijection of [0, n), evaluated per index: O(1) memory and O(1) to start anywhere.

    A balanced Feistel network on the smallest even bit width covering n is a permutation of [0, 2^bits)
    (Luby-Rackoff); cycle-walking (apply again until the value is < n) restricts it to [0, n).
    """

    ROUNDS = 6

    def __init__(self, n: int, seed: int, epoch: int) -> None:
        if n < 1:
            raise ValueError(f"WindowPermutation needs n >= 1, got {n}")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        bits += bits & 1
        self._half = np.uint64(bits // 2)
        self._mask = np.uint64((1 << (bits // 2)) - 1)
        base = _splitmix64(_splitmix64(seed & _MASK64) ^ (epoch & _MASK64))
        self._keys = [np.uint64(_splitmix64(base + r)) for r in range(self.ROUNDS)]

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self._half, x & self._mask
        for key in self._keys:
            left, right = right, left ^ (_mix64(right ^ key) & self._mask)
        return (left << self._half) | right

    def __call__(self, index: np.ndarray) -> np.ndarray:
        x = self._feistel(np.asarray(index, dtype=np.uint64))
        out = x >= self.n
        while out.any():
            x[out] = self._feistel(x[out])
            out = x >= self.n
        return x.astype(np.int64)


# ----------------------------------------------------------------------------------------------------------
# packing


class MemoryPart:
    """Documents held in memory (on-the-fly validation split), read like a ShardFile."""

    def __init__(self, tokens: np.ndarray, offsets: Sequence[int], name: str = "<memory>") -> None:
        self.tokens, self.name = tokens, name
        self.offsets_array = np.asarray(offsets, dtype=np.int64)
        self.offsets = self.offsets_array.tolist()
        self.n_tokens, self.n_docs = len(tokens), len(offsets) - 1


Part = Union[ShardFile, MemoryPart]
VECTORIZE_DOCS = 8  # a window over more documents than this is read with numpy, not segment by segment


class PackedStream:
    """The documents of `parts`, each as [BOS] tokens EOS, back to back: a virtual token array read by position."""

    def __init__(self, parts: list[Part], eos_id: int, bos_id: Optional[int], vocab_size: int) -> None:
        self.parts, self.eos_id, self.bos_id, self.vocab_size = parts, eos_id, bos_id, vocab_size
        self.sep = 1 + (bos_id is not None)  # separator tokens per document
        self.starts = [0]
        for part in parts:
            self.starts.append(self.starts[-1] + part.n_tokens + part.n_docs * self.sep)
        self.total = self.starts[-1]
        self.tokens = sum(p.n_tokens for p in parts)
        self.docs = sum(p.n_docs for p in parts)

    def n_windows(self, seq_len: int) -> int:
        """Windows of seq_len + 1 tokens at stride seq_len (the last < seq_len tokens are never used)."""
        return max(0, (self.total - 1) // seq_len)

    def read(self, start: int, out: np.ndarray) -> None:
        """Fill `out` with packed tokens [start, start + len(out))."""
        n, filled = len(out), 0
        if start < 0 or start + n > self.total:
            raise IndexError(f"packed range [{start}, {start + n}) outside [0, {self.total})")
        p = bisect_right(self.starts, start) - 1
        pos = start - self.starts[p]
        while filled < n:
            part = self.parts[p]
            take = min(n - filled, self.starts[p + 1] - self.starts[p] - pos)
            seg = out[filled:filled + take]
            first = self._doc_at(part, pos)
            probe = first + VECTORIZE_DOCS
            if probe < part.n_docs and part.offsets[probe] + probe * self.sep < pos + take:
                # more than VECTORIZE_DOCS documents; each spans >= 2 packed tokens, which bounds how many
                last = min(part.n_docs - 1, first + take // 2 + 1)
                self._fill_vectorized(part, pos, first, last, seg)
            else:
                self._fill_segments(part, pos, first, seg)
            if seg.max() >= self.vocab_size:  # the one check of shard contents on the hot path
                raise ShardError(
                    f"{part.name}: token id {int(seg.max())} >= vocab size {self.vocab_size} near document {first}: "
                    "the shard is corrupted; re-run `llmtrain prepare` on its folder"
                )
            filled += take
            p += 1
            pos = 0

    def _doc_at(self, part: Part, pos: int) -> int:
        """The document holding packed position pos of a part: the last d with off[d] + d*sep <= pos."""
        off, sep = part.offsets, self.sep
        return bisect_right(range(part.n_docs), pos, key=lambda d: off[d] + d * sep) - 1

    def _fill_segments(self, part: Part, pos: int, d: int, seg: np.ndarray) -> None:
        """Copy document by document (few, long documents)."""
        off, tokens, sep, has_bos = part.offsets, part.tokens, self.sep, self.bos_id is not None
        filled, n = 0, len(seg)
        while filled < n:
            a, b = off[d], off[d + 1]
            o = pos - (a + d * sep)  # offset inside this document's packed span [BOS] tokens EOS
            take = min(b - a + sep - o, n - filled)
            k = filled
            if has_bos and o == 0:
                seg[k] = self.bos_id
                k += 1
            t0, t1 = a + max(o + k - filled - has_bos, 0), min(a + o + take - has_bos, b)
            if t1 > t0:
                seg[k:k + t1 - t0] = tokens[t0:t1]
                k += t1 - t0
            if k < filled + take:
                seg[k] = self.eos_id
            filled += take
            pos += take
            d += 1

    def _fill_vectorized(self, part: Part, pos: int, first: int, last: int, seg: np.ndarray) -> None:
        """Gather all positions at once (many short documents; last may be past the last one touched)."""
        has_bos = int(self.bos_id is not None)
        offs = part.offsets_array[first:last + 2]  # (k+1,) raw offsets of documents first..last
        pstart = offs[:-1] + np.arange(first, last + 1, dtype=np.int64) * self.sep  # (k,) packed starts
        positions = np.arange(pos, pos + len(seg), dtype=np.int64)
        doc = np.searchsorted(pstart, positions, side="right") - 1  # (n,) document of each position
        o = positions - pstart[doc]  # offset in the packed document
        length = offs[doc + 1] - offs[doc]
        is_token = (o >= has_bos) & (o < length + has_bos)
        seg[:] = part.tokens[np.where(is_token, offs[doc] + o - has_bos, 0)]
        seg[~is_token] = self.eos_id
        if has_bos:
            seg[o == 0] = self.bos_id


def document_ids_and_positions(input_ids: np.ndarray, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, T) document ids (0, 1, ... per row; a document starts after each EOS) and positions within them."""
    starts = np.zeros(input_ids.shape, dtype=bool)
    starts[:, 1:] = input_ids[:, :-1] == eos_id  # EOS ends a document (it is never produced inside one)
    doc_ids = np.cumsum(starts, axis=1, dtype=np.int64)
    index = np.broadcast_to(np.arange(input_ids.shape[1], dtype=np.int64), input_ids.shape)
    seg_start = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    return doc_ids, index - seg_start


FIELDS = ("input_ids", "labels", "document_ids", "position_ids")


def _to_block(windows: np.ndarray, document_masking: bool, eos_id: int) -> np.ndarray:
    """(B, T+1) windows -> one int64 block (fields, B, T): input_ids, labels[, document_ids, position_ids]."""
    block = np.empty((4 if document_masking else 2, windows.shape[0], windows.shape[1] - 1), dtype=np.int64)
    block[0] = windows[:, :-1]
    block[1] = windows[:, 1:]
    if document_masking:
        block[2], block[3] = document_ids_and_positions(block[0], eos_id)
    return block


def _keep(block: np.ndarray) -> np.ndarray:
    """collate_fn: leave the block as it is (numpy, so a worker sends it through the pipe in one piece)."""
    return block


class BatchLoader(DataLoader):
    """A DataLoader whose dataset yields each batch as one numpy block; batches reach the caller as dicts of
    int64 (B, T) tensors (zero-copy views of the block).

    Why numpy: a worker's numpy block is pickled through the pipe, 3-6x faster per batch (measured, see
    docs/data.md) than torch's shared-memory handover of tensors, which dominates for batches this size.
    """

    def __init__(self, dataset: IterableDataset, num_workers: int, pin: bool) -> None:
        super().__init__(dataset, batch_size=None, num_workers=num_workers, collate_fn=_keep,
                         persistent_workers=False)  # workers must fork with the position of each new iterator
        self.pin = pin

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:  # type: ignore[override]
        for block in super().__iter__():
            tensor = torch.from_numpy(block)
            if self.pin:
                tensor = tensor.pin_memory()
            yield dict(zip(FIELDS, tensor.unbind(0)))


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


# ----------------------------------------------------------------------------------------------------------
# datasets: each yields whole batches; the DataLoader runs with batch_size=None


class _Position:
    """The training position, shared by the DataModule and its train dataset (read when an iterator starts)."""

    def __init__(self) -> None:
        self.samples = 0


class _ShardTrainBatches(IterableDataset):
    """Infinite seeded stream of this rank's training batches over the packed shards."""

    def __init__(self, stream: PackedStream, seq_len: int, micro_batch_size: int, rank: int, world_size: int,
                 seed: int, position: _Position, document_masking: bool) -> None:
        self.stream, self.seq_len, self.batch = stream, seq_len, micro_batch_size
        self.rank, self.world = rank, world_size
        self.seed, self.position, self.document_masking = seed, position, document_masking
        self.n_windows = stream.n_windows(seq_len)

    def window_ids(self, samples: np.ndarray) -> np.ndarray:
        """Window ids of global sample indices (any shape): window perm_e(g mod n) of epoch e = g // n."""
        epochs, local = np.divmod(samples, self.n_windows)
        out = np.empty_like(samples)
        for epoch in np.unique(epochs).tolist():
            mask = epochs == epoch
            out[mask] = WindowPermutation(self.n_windows, self.seed, epoch)(local[mask])
        return out

    def __iter__(self) -> Iterator[np.ndarray]:
        start = self.position.samples  # read when the iterator starts (in workers: as forked at that moment)
        k, n_workers = _worker()
        return self._batches(start, k, n_workers)

    def _batches(self, start: int, k: int, n_workers: int) -> Iterator[np.ndarray]:
        B, T = self.batch, self.seq_len
        global_batch = B * self.world
        block = max(1, 4096 // B)  # batches whose window ids are computed together (numpy overhead)
        j = k  # this worker's batches of the rank: j = k, k + K, k + 2K, ...
        while True:
            js = j + n_workers * np.arange(block, dtype=np.int64)
            samples = start + js[:, None] * global_batch + self.rank * B + np.arange(B, dtype=np.int64)
            for ids in self.window_ids(samples).tolist():
                windows = np.empty((B, T + 1), dtype=np.int64)
                for row, w in zip(windows, ids):
                    self.stream.read(w * T, row)
                yield _to_block(windows, self.document_masking, self.stream.eos_id)
            j += n_workers * block


class _ValBatches(IterableDataset):
    """This rank's contiguous share of the validation windows, in order, in batches (finite)."""

    def __init__(self, stream: PackedStream, seq_len: int, micro_batch_size: int, rank: int, world_size: int,
                 document_masking: bool) -> None:
        self.stream, self.seq_len, self.batch = stream, seq_len, micro_batch_size
        self.document_masking = document_masking
        per_rank = stream.n_windows(seq_len) // world_size  # equal counts on every rank (remainder dropped)
        self.first, self.count = rank * per_rank, per_rank

    def __len__(self) -> int:
        return -(-self.count // self.batch)

    def __iter__(self) -> Iterator[np.ndarray]:
        k, n_workers = _worker()
        for j in range(k, len(self), n_workers):
            lo = self.first + j * self.batch
            hi = min(lo + self.batch, self.first + self.count)
            windows = np.empty((hi - lo, self.seq_len + 1), dtype=np.int64)
            for row, w in zip(windows, range(lo, hi)):
                self.stream.read(w * self.seq_len, row)
            yield _to_block(windows, self.document_masking, self.stream.eos_id)


class _StreamTrainBatches(IterableDataset):
    """On-the-fly mode: this rank's training batches, tokenized from the source in each worker."""

    def __init__(self, source: Source, tokenizer: Tokenizer, seq_len: int, micro_batch_size: int, rank: int,
                 world_size: int, seed: int, position: _Position, document_masking: bool, add_bos: bool,
                 val_fraction: float) -> None:
        self.source, self.tokenizer, self.seq_len, self.batch = source, tokenizer, seq_len, micro_batch_size
        self.rank, self.world, self.seed, self.position = rank, world_size, seed, position
        self.document_masking, self.add_bos, self.val_fraction = document_masking, add_bos, val_fraction

    def __iter__(self) -> Iterator[np.ndarray]:
        start_batch = self.position.samples // (self.batch * self.world)  # the rank's batches already consumed
        k, n_workers = _worker()
        return self._batches(start_batch, k, n_workers)

    def _windows(self, stream_id: int, n_streams: int) -> Iterator[np.ndarray]:
        tok, T = self.tokenizer, self.seq_len
        head = [tok.bos_id] if self.add_bos else []
        pending = np.empty(0, dtype=np.int64)
        while True:  # epochs
            train_docs = mine = 0
            for i, text in enumerate(self.source.documents()):
                if is_validation_document(i, self.val_fraction):
                    continue
                train_docs += 1
                if (train_docs - 1) % n_streams != stream_id:
                    continue
                mine += 1
                pending = np.concatenate([pending, np.asarray(head + tok.encode(text) + [tok.eos_id], dtype=np.int64)])
                while len(pending) >= T + 1:
                    yield pending[:T + 1]
                    pending = pending[T:]
            if mine == 0:
                raise ValueError(
                    f"too little data: source {self.source.spec!r} has {train_docs} training documents, fewer than "
                    f"the {n_streams} streams (world_size * max(1, num_workers)) that read it on the fly; "
                    "use fewer workers, more documents, or prepared shards"
                )

    def _batches(self, start_batch: int, k: int, n_workers: int) -> Iterator[np.ndarray]:
        # Rank batch g comes from stream g mod K. A new iterator takes its first batch from worker 0, so
        # worker k plays stream (start_batch + k) mod K, after the batches that stream already produced.
        local = (start_batch + k) % n_workers
        stream_id = self.rank * n_workers + local
        windows = self._windows(stream_id, self.world * n_workers)
        rng = np.random.default_rng([self.seed, stream_id])
        buffer = [next(windows) for _ in range(SHUFFLE_BUFFER)]

        def next_window() -> np.ndarray:
            i = int(rng.integers(len(buffer)))
            out, buffer[i] = buffer[i], next(windows)
            return out

        skip = max(0, -(-(start_batch - local) // n_workers))  # the stream's batches g < start_batch
        for _ in range(skip * self.batch):
            next_window()
        while True:
            rows = np.stack([next_window() for _ in range(self.batch)])
            yield _to_block(rows, self.document_masking, self.tokenizer.eos_id)


# ----------------------------------------------------------------------------------------------------------
# the DataModule


class TokenDataModule(L.LightningDataModule):
    """Packed token sequences for pretraining, from prepared shards (data_dir) or a source tokenized on the fly.

    Args:
        data_dir: folder made by `llmtrain prepare` (metadata.json, shards, tokenizer/). Takes precedence.
        source: on-the-fly mode (data_dir None): a source spec (file, folder, glob, hub:NAME[:CONFIG][@SPLIT]).
        tokenizer: tokenizer folder or .model; required on the fly; with data_dir it is checked against the
            shards' tokenizer hash (None: use the copy in data_dir/tokenizer).
        text_field: the text column of .jsonl/.parquet/hub sources (on-the-fly mode).
        seq_len: tokens per training sequence (each sample holds seq_len + 1 tokens: inputs and next-token labels).
        micro_batch_size: sequences per rank per step.
        global_batch_size: sequences per optimizer step over all ranks. Set, it fixes the trainer's
            accumulate_grad_batches to global_batch_size / (micro_batch_size * world_size) at setup, so the recipe's
            batch stays the same on any number of GPUs (a resume on another world size included) and
            micro_batch_size becomes a memory and speed setting. None: the trainer's accumulate_grad_batches as given.
        val_micro_batch_size: sequences per rank per validation step (None: micro_batch_size).
        num_workers: DataLoader worker processes per rank (0: load in the training process).
        seed: seed of the training order (each epoch reshuffled with seed and epoch).
        add_bos: put BOS before every document (EOS always ends one).
        document_masking: also return document_ids and position_ids (B, T) for attention within documents.
        pin_memory: pin batches in page-locked memory (only effective when CUDA is available).
        val_fraction: on-the-fly mode: the share of documents held out for validation (prepare's rule).
        txt_sample_by: on-the-fly mode: what a document of a .txt file is: "document", "paragraph" or "line".
        extensions: on-the-fly mode: more file suffixes read as plain text, one file = one document (["py", "md"]).
        verify_shards: check every shard's sha256 against metadata.json before training (shards hashed once, then
            cached while unchanged; see llmtrain/data/verify.py). False skips it: only for data you trust.
        allow_batch_change: let a resume change the tokens per optimizer step (global batch x seq_len) that the
            checkpoint trained with; without it such a resume is refused, since it changes the recipe silently.
    """

    def __init__(
        self,
        data_dir: Optional[str] = None,
        source: Optional[str] = None,
        tokenizer: Optional[str] = None,
        text_field: str = "text",
        seq_len: int = 2048,
        micro_batch_size: int = 8,
        global_batch_size: Optional[int] = None,
        val_micro_batch_size: Optional[int] = None,
        num_workers: int = 2,
        seed: int = 1234,
        add_bos: bool = False,
        document_masking: bool = False,
        pin_memory: bool = True,
        val_fraction: float = 0.005,
        txt_sample_by: str = "document",
        extensions: Optional[list[str]] = None,
        verify_shards: bool = True,
        allow_batch_change: bool = False,
    ) -> None:
        super().__init__()
        if data_dir is None and (source is None or tokenizer is None):
            raise ValueError("data: give data_dir (prepared shards), or source and tokenizer (on-the-fly mode)")
        for name, value in (("seq_len", seq_len), ("micro_batch_size", micro_batch_size),
                            ("global_batch_size", 1 if global_batch_size is None else global_batch_size),
                            ("val_micro_batch_size", 1 if val_micro_batch_size is None else val_micro_batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"data: {name}={value!r} is invalid: must be an int >= 1")
        if num_workers < 0:
            raise ValueError(f"data: num_workers={num_workers} is invalid: must be >= 0")
        self.data_dir, self.source, self.tokenizer, self.text_field = data_dir, source, tokenizer, text_field
        self.seq_len, self.micro_batch_size, self.global_batch_size = seq_len, micro_batch_size, global_batch_size
        self.val_micro_batch_size = val_micro_batch_size or micro_batch_size
        self.num_workers, self.seed, self.add_bos = num_workers, seed, add_bos
        self.document_masking, self.pin_memory = document_masking, pin_memory
        self.val_fraction, self.txt_sample_by = val_fraction, txt_sample_by
        self.extensions, self.verify_shards, self.allow_batch_change = extensions, verify_shards, allow_batch_change
        self._position = _Position()
        self._distributed: Optional[tuple[int, int]] = None
        self._global_batch = 0  # B * world of the current train dataloader
        self._loaded_state: Optional[dict[str, Any]] = None
        self._ready = False

    # -- setup -----------------------------------------------------------------------------------------------

    @property
    def on_the_fly(self) -> bool:
        return self.data_dir is None

    def set_distributed(self, rank: int, world_size: int) -> None:
        """Use this rank / world size instead of the trainer's (for use without a Trainer)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is invalid for world_size={world_size}")
        self._distributed = (rank, world_size)

    def _rank_world(self) -> tuple[int, int]:
        if self._distributed is not None:
            return self._distributed
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        return 0, 1

    def setup(self, stage: Optional[str] = None) -> None:
        if self.global_batch_size is not None and self.trainer is not None:
            self.trainer.accumulate_grad_batches = self.accumulation(self.trainer.accumulate_grad_batches)
        if self._ready:
            return
        if self.on_the_fly:
            self._setup_on_the_fly()
        else:
            self._setup_shards()
        if self.add_bos and self._tok.bos_id < 0:
            raise ValueError(f"data: add_bos=True but tokenizer {self.tokenizer_path} has no BOS id")
        self._ready = True
        _, world = self._rank_world()
        self._check_enough("train", self._train_windows(), self.micro_batch_size * world)
        if self._val.docs:
            self._check_enough("val", self._val.n_windows(self.seq_len), world)

    def prepare_data(self) -> None:
        # Lightning calls this on one process per node, behind a barrier with no timeout: the first (slow) hash
        # of the shards happens here once, and every rank's setup() then finds them in the cache.
        if not self.on_the_fly and self.verify_shards:
            verify_folder(self.data_dir)  # type: ignore[arg-type]

    def _setup_shards(self) -> None:
        data_dir = Path(self.data_dir)  # type: ignore[arg-type]
        meta = read_metadata(data_dir)
        if self.verify_shards:
            verify_folder(data_dir)
        else:
            log.warning("data: verify_shards is off: the shards of %s are not checked against their sha256",
                        data_dir)
        settings = meta["settings"]
        self._tokenizer_path = str((Path(self.tokenizer) if self.tokenizer else data_dir / TOKENIZER_DIR).resolve())
        self._tok = load_tokenizer(self._tokenizer_path)
        if self._tok.sha256 != settings["tokenizer_sha256"]:
            raise ShardError(
                f"{data_dir}: shards were made with tokenizer sha256 {settings['tokenizer_sha256'][:12]}, but "
                f"{self._tokenizer_path} has sha256 {self._tok.sha256[:12]}: re-run `llmtrain prepare` with this "
                "tokenizer, or use the tokenizer the shards were made with"
            )
        self._vocab_size = int(settings["vocab_size"])
        bos = self._tok.bos_id if self.add_bos else None
        self._split_counts = {s: meta["splits"][s] for s in ("train", "val")}
        self._train = PackedStream(open_split(data_dir, meta, "train"), self._tok.eos_id, bos, self._vocab_size)
        self._val = PackedStream(open_split(data_dir, meta, "val"), self._tok.eos_id, bos, self._vocab_size)

    def _setup_on_the_fly(self) -> None:
        self._tokenizer_path = str(Path(self.tokenizer).resolve())  # type: ignore[arg-type]
        self._tok = load_tokenizer(self._tokenizer_path)
        self._vocab_size = self._tok.vocab_size
        self._src = parse_source(self.source, self.text_field, self.txt_sample_by,  # type: ignore[arg-type]
                                 self.extensions)
        tokens: list[int] = []
        offsets, n_bytes = [0], 0
        for i, text in enumerate(self._src.documents()):
            if not is_validation_document(i, self.val_fraction):
                continue
            tokens += self._tok.encode(text)
            offsets.append(len(tokens))
            n_bytes += len(text.encode())
            if len(tokens) >= VAL_TOKEN_BUDGET:
                break
        part = MemoryPart(np.asarray(tokens, dtype=np.int64), offsets, name=f"validation documents of {self.source}")
        bos = self._tok.bos_id if self.add_bos else None
        self._val = PackedStream([part], self._tok.eos_id, bos, self._vocab_size)
        self._split_counts = {"val": {"tokens": len(tokens), "documents": len(offsets) - 1, "bytes": n_bytes}}

    def _train_windows(self) -> Optional[int]:
        return None if self.on_the_fly else self._train.n_windows(self.seq_len)

    def _where(self) -> str:
        return self.data_dir if not self.on_the_fly else f"source {self.source}"  # type: ignore[return-value]

    def accumulation(self, trainer_value: int = 1) -> int:
        """Micro-batches per optimizer step that make global_batch_size on this world size; `trainer_value` is the
        trainer's accumulate_grad_batches, which must be left at 1 or agree."""
        _, world = self._rank_world()
        per_step = self.micro_batch_size * world
        steps, remainder = divmod(self.global_batch_size, per_step)
        if remainder or steps < 1:
            raise ValueError(
                f"data: global_batch_size={self.global_batch_size} is not a multiple of micro_batch_size "
                f"{self.micro_batch_size} x world_size {world} = {per_step}: choose a multiple of {per_step}, or "
                "another micro_batch_size")
        if trainer_value not in (1, steps):
            raise ValueError(
                f"data: global_batch_size={self.global_batch_size} needs accumulate_grad_batches={steps} on "
                f"{world} rank(s) x micro_batch_size {self.micro_batch_size}, but trainer.accumulate_grad_batches="
                f"{trainer_value}: leave trainer.accumulate_grad_batches unset (1) or drop data.global_batch_size")
        return steps

    def _check_enough(self, split: str, windows: Optional[int], needed: int) -> None:
        if windows is None or windows >= needed:
            return
        stream = self._train if split == "train" else self._val
        what = "micro_batch_size * world_size" if split == "train" else "one sequence per rank (world_size)"
        raise ValueError(
            f"too little data: the {split} split of {self._where()} has {stream.tokens} tokens in {stream.docs} "
            f"documents, {windows} sequences of seq_len + 1 = {self.seq_len + 1} tokens; one batch needs {needed} "
            f"({what}); use more data or a smaller seq_len / micro_batch_size"
        )

    # -- properties the LightningModule uses ------------------------------------------------------------------

    def _require_setup(self) -> None:
        if not self._ready:
            raise RuntimeError("TokenDataModule: call setup() first (the Trainer does this before fitting)")

    @property
    def vocab_size(self) -> int:
        self._require_setup()
        return self._vocab_size

    @property
    def tokenizer_path(self) -> str:
        self._require_setup()
        return self._tokenizer_path

    def check_vocab(self, model_vocab_size: int) -> None:
        """Raise ValueError naming both sizes if the model's vocab size differs from the tokenizer's."""
        self._require_setup()
        if int(model_vocab_size) != self._vocab_size:
            raise ValueError(
                f"vocab size mismatch: the model has vocab_size={model_vocab_size}, the tokenizer "
                f"{self._tokenizer_path} (data {self._where()}) has {self._vocab_size}; set the model's "
                f"vocab_size to {self._vocab_size}"
            )

    def bytes_per_token(self, split: str = "val") -> float:
        """Raw UTF-8 bytes per packed token of a split (separators counted), so bpb = loss_nats / ln 2 / this.

        Shards: exact, from metadata. On the fly: "val" is exact for the validation documents collected,
        "train" is estimated from the first VAL_TOKEN_BUDGET tokens of training documents.
        """
        self._require_setup()
        if split not in ("train", "val"):
            raise ValueError(f"split={split!r} is invalid: choose train or val")
        if split not in self._split_counts:
            self._split_counts[split] = self._estimate_train_counts()
        c = self._split_counts[split]
        packed = c["tokens"] + c["documents"] * (1 + self.add_bos)
        if packed == 0:
            raise ValueError(f"the {split} split of {self._where()} is empty: no bytes per token")
        return c["bytes"] / packed

    def _estimate_train_counts(self) -> dict[str, int]:
        counts = {"tokens": 0, "documents": 0, "bytes": 0}
        for i, text in enumerate(self._src.documents()):
            if is_validation_document(i, self.val_fraction):
                continue
            counts["tokens"] += len(self._tok.encode(text))
            counts["documents"] += 1
            counts["bytes"] += len(text.encode())
            if counts["tokens"] >= VAL_TOKEN_BUDGET:
                break
        return counts

    # -- dataloaders -----------------------------------------------------------------------------------------

    def _loader(self, dataset: IterableDataset) -> BatchLoader:
        return BatchLoader(dataset, self.num_workers, pin=self.pin_memory and torch.cuda.is_available())

    def train_dataloader(self) -> BatchLoader:
        self.setup()
        rank, world = self._rank_world()
        self._check_enough("train", self._train_windows(), self.micro_batch_size * world)
        self._global_batch = self.micro_batch_size * world
        dataset: IterableDataset
        if self.on_the_fly:
            self._check_on_the_fly_resume(world)
            dataset = _StreamTrainBatches(
                self._src, self._tok, self.seq_len, self.micro_batch_size, rank, world, self.seed, self._position,
                self.document_masking, self.add_bos, self.val_fraction,
            )
        else:
            dataset = _ShardTrainBatches(self._train, self.seq_len, self.micro_batch_size, rank, world, self.seed,
                                         self._position, self.document_masking)
        return self._loader(dataset)

    def val_dataloader(self) -> Union[BatchLoader, list]:
        self.setup()
        rank, world = self._rank_world()
        if self._val.docs == 0:
            log.warning("%s has no validation split: validation is skipped", self._where())
            return []
        self._check_enough("val", self._val.n_windows(self.seq_len), world)
        return self._loader(_ValBatches(self._val, self.seq_len, self.val_micro_batch_size, rank, world,
                                        self.document_masking))

    # -- position and resume ---------------------------------------------------------------------------------

    @property
    def consumed_samples(self) -> int:
        """Global training samples consumed so far (all ranks), plus any skipped."""
        return self._position.samples

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Count a training batch when the loop takes it (not when a worker prefetches it): this is the
        # position that a checkpoint taken after this step must resume from.
        if self.trainer is not None and self.trainer.training:
            self._position.samples += self._global_batch
        return batch

    def skip_train_samples(self, n: int) -> None:
        """Advance the training stream by n global samples without yielding them.

        Takes effect when the next train iterator starts; an iterator already running is not moved. With
        Lightning, call it before `trainer.fit` or, when resuming, in a callback's `on_fit_start` (after the
        checkpoint's position is restored, before Lightning 2.6 creates the train iterator, which it does
        before `on_train_start`). The skip is part of `state_dict` at once. On the fly, n must be a multiple
        of micro_batch_size * world_size.
        """
        if n < 0:
            raise ValueError(f"skip_train_samples: n={n} must be >= 0")
        _, world = self._rank_world()
        if self.on_the_fly and n % (self.micro_batch_size * world):
            raise ValueError(
                f"skip_train_samples: on the fly, n={n} must be a multiple of micro_batch_size * world_size = "
                f"{self.micro_batch_size * world}"
            )
        self._position.samples += n

    def state_dict(self) -> dict[str, Any]:
        rank, world = self._rank_world()
        return {
            "version": STATE_VERSION,
            "mode": "on_the_fly" if self.on_the_fly else "shards",
            "consumed_samples": self._position.samples,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "micro_batch_size": self.micro_batch_size,
            "world_size": world,
            "num_workers": self.num_workers,
            "add_bos": self.add_bos,
            "train_windows": self._train_windows() if self._ready else None,
            "global_batch_size": self._global_batch_sequences(),
            "tokens_per_step": self._global_batch_sequences() * self.seq_len,
        }

    def _global_batch_sequences(self) -> int:
        """Sequences per optimizer step over all ranks: micro_batch_size x world_size x accumulation."""
        _, world = self._rank_world()
        if self.trainer is not None:
            accumulation = self.trainer.accumulate_grad_batches
        else:
            accumulation = self.accumulation() if self.global_batch_size is not None else 1
        return self.micro_batch_size * world * accumulation

    def _check_tokens_per_step(self, state: dict[str, Any]) -> None:
        """Refuse a resume that changes the tokens per optimizer step: the learning rate and schedule were set
        for the checkpoint's batch, and a new one (another micro batch or GPU count without global_batch_size)
        changes the recipe with no other sign."""
        old = state.get("tokens_per_step")
        now = self._global_batch_sequences() * self.seq_len
        if old is None or old == now:
            return
        old_batch, old_len = state["global_batch_size"], state["seq_len"]
        _, world = self._rank_world()
        what = (f"the checkpoint trained with {old} tokens per optimizer step (global batch {old_batch} sequences x "
                f"seq_len {old_len}), this run would take {now} (global batch {now // self.seq_len} = micro_batch_size "
                f"{self.micro_batch_size} x world_size {world} x accumulation "
                f"{now // self.seq_len // (self.micro_batch_size * world)}, x seq_len {self.seq_len})")
        if self.allow_batch_change:
            log.warning("data: %s; continuing, as data.allow_batch_change is set", what)
            return
        keep = (f"--data.global_batch_size {old // self.seq_len}" if old % self.seq_len == 0
                else f"--data.seq_len {old_len} --data.global_batch_size {old_batch}")
        raise ValueError(f"data: resume refused: {what}. Keep the recipe with {keep}, or change it knowingly with "
                         "--data.allow_batch_change true")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("version") != STATE_VERSION:
            raise ValueError(f"data state version {state_dict.get('version')} is not {STATE_VERSION}")
        mode = "on_the_fly" if self.on_the_fly else "shards"
        if state_dict["mode"] != mode:
            raise ValueError(f"the checkpoint's data position is for {state_dict['mode']} data, this run uses {mode}")
        changed = [k for k in ("seed", "seq_len", "add_bos") if state_dict[k] != getattr(self, k)]
        if self._ready and state_dict["train_windows"] not in (None, self._train_windows()):
            changed.append("train_windows (the data)")
        self._check_tokens_per_step(state_dict)
        if changed and not self.on_the_fly:
            log.warning("data: %s changed since the checkpoint: training continues at sample %d of a different "
                        "order", ", ".join(changed), state_dict["consumed_samples"])
        self._position.samples = int(state_dict["consumed_samples"])
        self._loaded_state = dict(state_dict)

    def _check_on_the_fly_resume(self, world: int) -> None:
        s = self._loaded_state
        if s is None:
            return
        now = {"seed": self.seed, "seq_len": self.seq_len, "micro_batch_size": self.micro_batch_size,
               "world_size": world, "num_workers": self.num_workers, "add_bos": self.add_bos}
        diff = {k: (s[k], v) for k, v in now.items() if s[k] != v}
        if diff:
            raise ValueError(f"on-the-fly resume needs the same data settings as the checkpoint; changed: {diff}")
        if self._position.samples % (self.micro_batch_size * world):
            raise ValueError(f"on-the-fly position {self._position.samples} is not a whole number of global batches")
