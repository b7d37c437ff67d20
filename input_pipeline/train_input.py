"""The training input pipeline: grain over the extracted TFDS array_record dataset.

Per process p of P, for a seed:

  MapDataset.range(S).repeat()   S = steps per epoch = (E / P) // b, E = examples usable by
                                 every process (num_examples // P * P), b = batch_size // P
    .map_with_index(ReadBatch)   step k: epoch e = k // S; the first E of a permutation of all
                                 examples drawn from (seed, e) (global shuffle, new every
                                 epoch); this process's entries p, p + P, ... (disjoint); batch
                                 k % S of those; each example's flip copy from (seed, e,
                                 example) (the original with `data.random_flip=False`); one
                                 batched array_record read; decode to float32
    .to_iter_dataset()           small read-ahead (`config.data.prefetch` batches)
    .mp_prefetch(workers)        `config.data.num_workers` processes (0: read in this process)

Batches are {"x": float32 [b, h, w, c], "label": int32 [b]} (no "label" for unlabelled data):
moments (mean, logvar) for latent configs, pixels in [-1, 1] for pixel configs. Text datasets
give {"x", "context": float32 [b, L, D]} instead: one of the example's captions, drawn from
(seed, epoch, example) (`caption_choices`), read with a second batched read. Each epoch
shows every example at most once; the few left over (num_examples % P, and (E / P) % b per
process) are dropped, different ones every epoch. The batch depends only on the seed, the
process index/count and the step, so the iterator state (a position) saved with
`grain.checkpoint.CheckpointSave` restores exactly.

Why per-batch rather than grain's per-example `shuffle` / slice / `batch`: those cost ~60 us of
Python per example (index_shuffle, nested __getitem__s), which capped one process at ~12k
examples/s on 2 cores; a vectorised permutation lookup and one batched read per step leave the
time to the array_record reads themselves. The permutation (8 bytes per example, ~10 MiB for
ImageNet) is computed once per epoch in each worker.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from typing import Any

import grain
import numpy as np

from input_pipeline import latent_dataset
from input_pipeline.errors import DataConfigError, DataError

_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, elementwise on uint64 (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def example_hash(seed: int, epochs: np.ndarray, examples: np.ndarray) -> np.ndarray:
    """uint64 [n] hash of (seed, epoch, example): deterministic, independent of batch and
    worker layout, and fresh every epoch."""
    with np.errstate(over="ignore"):
        z = _splitmix64(np.asarray([seed], np.uint64) * _GOLDEN + epochs.astype(np.uint64))
        return _splitmix64(z * _GOLDEN + examples.astype(np.uint64))


def flip_bits(seed: int, epochs: np.ndarray, examples: np.ndarray) -> np.ndarray:
    """Which copy (0 original, 1 flipped) each example uses in its epoch: int64 [n].

    The top bit of `example_hash`, so over epochs each example is seen flipped about half the
    time.
    """
    return (example_hash(seed, epochs, examples) >> np.uint64(63)).astype(np.int64)


def caption_choices(
    seed: int, epochs: np.ndarray, examples: np.ndarray, num_contexts: np.ndarray
) -> np.ndarray:
    """Which of its captions each example uses in its epoch: int64 [n] in [0, num_contexts).

    U-ViT draws one caption per example and step; the low 32 bits of `example_hash` (the flip
    uses the top bit) make the draw uniform up to 2**-32 and independent of the flip.
    """
    low = example_hash(seed, epochs, examples) & np.uint64(0xFFFFFFFF)
    return (low % np.maximum(num_contexts, 1).astype(np.uint64)).astype(np.int64)


class LabelOutOfRangeError(DataError, ValueError):
    """A batch holds a label outside the model's classes; names the dataset, example, label."""


class ReadBatch(grain.transforms.MapWithIndex):
    """Global step k -> this process's batch k, decoded.

    Epoch e = k // steps_per_epoch uses the first E of a permutation of all examples drawn from
    (seed, e); global batch j of the epoch is the next B = P b entries, of which process p of P
    takes the contiguous block p (disjoint, together complete, and the same global batch for any
    P). Each example's flip copy is `flip_bits(seed, e, example)`.
    """

    def __init__(
        self,
        reader: latent_dataset.RecordReader,
        *,
        seed: int,
        num_examples: int,
        batch_size: int,
        process_index: int,
        process_count: int,
        labelled: bool,
        include_index: bool,
        with_contexts: bool = False,
        label_limit: int | None = None,
        where: str = "",
        random_flip: bool = True,
    ):
        self._reader = reader
        self._random_flip = random_flip
        self._seed = seed
        self._num_examples = num_examples
        self._usable = num_examples // process_count * process_count
        self._steps_per_epoch = self._usable // process_count // batch_size
        self._batch = batch_size
        self._process_index = process_index
        self._process_count = process_count
        self._labelled = labelled
        self._include_index = include_index
        self._with_contexts = with_contexts
        self._label_limit = label_limit
        self._where = where
        self._perm: tuple[int, np.ndarray] | None = None

    def _check_labels(self, labels: np.ndarray, indices: np.ndarray) -> None:
        """Every batch, two comparisons: a label past the model's table would train into NaN,
        one equal to its null class as unconditional."""
        bad = np.flatnonzero((labels < 0) | (labels >= self._label_limit))
        if bad.size:
            raise LabelOutOfRangeError(
                f"dataset {self._where}: example {int(indices[bad[0]])} has label "
                f"{int(labels[bad[0]])}: expected labels in [0, {self._label_limit}), the model's "
                "classes"
            )

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_perm"] = None  # recomputed in each worker
        return state

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            rng = np.random.Generator(np.random.Philox(key=[self._seed, epoch]))
            # Truncate after permuting, so the (< P) examples left over differ every epoch.
            self._perm = (epoch, rng.permutation(self._num_examples)[: self._usable])
        return self._perm[1]

    def example_ids(self, step: int) -> tuple[int, np.ndarray]:
        """(epoch, example ids [b]) of this process's batch `step`."""
        epoch, j = divmod(step, self._steps_per_epoch)
        # Process p takes the contiguous block p of global batch j: the global array puts
        # process p's rows at [p*b, (p+1)*b), so every row meets the same data (and noise) on
        # any number of processes.
        start = (j * self._process_count + self._process_index) * self._batch
        positions = np.arange(start, start + self._batch, dtype=np.int64)
        return epoch, self._permutation(epoch)[positions]

    def map_with_index(self, index: int, element: Any) -> dict[str, np.ndarray]:
        del element  # the position in the stream is all that matters
        epoch, examples = self.example_ids(index)
        # Record 2k is example k, record 2k + 1 its horizontal flip (see latent_dataset).
        epochs = np.full_like(examples, epoch)
        records = 2 * examples
        if self._random_flip:
            records = records + flip_bits(self._seed, epochs, examples)
        batch = self._reader.read(records)
        out = {"x": batch["x"]}
        if self._labelled:
            out["label"] = batch["label"]
            if self._label_limit is not None:
                self._check_labels(batch["label"], batch["index"])
        if self._include_index:
            out["index"] = batch["index"]
            out["flip"] = batch["flip"]
        if self._with_contexts:
            choice = caption_choices(self._seed, epochs, examples, batch["num_contexts"])
            contexts = self._reader.read_contexts(batch["context_start"] + choice)
            out["context"] = contexts["context"]
            if self._include_index:
                out["context_id"] = batch["context_start"] + choice
        return out


def _ensure_absl_flags_parsed() -> None:
    # grain's worker processes read an absl flag; outside `absl.app.run` (tests, notebooks)
    # the flags are unparsed and the workers would fail with UnparsedFlagAccessError.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def exit_with_parent(worker_index: int, worker_count: int, *, parent: int) -> None:
    """grain worker start-up: the worker exits within a second of the death of `parent` (the
    pid of the process that started the workers).

    A trainer killed with SIGKILL cannot stop its workers, which otherwise live on (hundreds of
    MiB each, with their shared memory) once adopted by init; a daemon thread notices the
    adoption by the changed parent pid, also when the trainer died while this worker was still
    starting. (PR_SET_PDEATHSIG would fire when the *thread* that started the worker ends, and
    grain starts them from a thread that may end before the trainer does.)
    """
    del worker_index, worker_count

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="exit_with_parent", daemon=True).start()


def make_train_dataset(
    config: Any,
    *,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    data_dir: str | os.PathLike | None = None,
    include_index: bool = False,
    start_step: int = 0,
    label_limit: int | None = None,
) -> grain.IterDataset:
    """The per-process training `IterDataset` (see the module docstring).

    Args:
      config: uses `data.latent_dir`, `data.split`, `data.num_workers`, `data.prefetch`,
        `data.random_flip`, `train.batch_size` (global), `model.img_size/in_chans`,
        `autoencoder.kind/scale_factor`.
      seed: shuffle and flip seed (taken modulo 2**32).
      process_index, process_count: default jax's; pass them to simulate hosts.
      data_dir: the dataset directory, when `config.data.latent_dir` is empty.
      include_index: also yield the source `index` and `flip` of every example (tests).
      start_step: begin at this global step: how a run resumes when its saved iterator state
        was written by another number of processes (batch k is the same for any count).
      label_limit: if given, every batch's labels must lie in [0, label_limit) (the model's
        classes, its null class excluded).
    Raises:
      DatasetMismatchError: the dataset's record shape, autoencoder or scale factor differ from
        the config's (the message names both), or it is too small for one batch per process.
      CorruptShardError: a shard file is missing or truncated (named).
      LabelOutOfRangeError (when the batch is read): names the dataset, example and label.
    """
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    directory = config.data.latent_dir or data_dir
    if not directory:
        raise DataConfigError("config.data.latent_dir is empty: set it to the extracted dataset")
    dataset = latent_dataset.open_dataset(directory, config.data.split)
    latent_dataset.check_compatible(dataset, config)

    global_batch = config.train.batch_size
    if global_batch % process_count:
        raise DataConfigError(
            f"config.train.batch_size={global_batch} is not divisible by {process_count} processes"
        )
    batch = global_batch // process_count
    per_process = dataset.num_examples // process_count
    if per_process < batch:
        raise latent_dataset.DatasetMismatchError(
            f"dataset {directory} has {dataset.num_examples} examples: fewer than one batch of "
            f"{batch} per process for {process_count} processes"
        )
    seed = int(seed) % 2**32
    read = ReadBatch(
        latent_dataset.RecordReader(dataset),
        seed=seed,
        num_examples=dataset.num_examples,
        batch_size=batch,
        process_index=process_index,
        process_count=process_count,
        labelled=dataset.spec.num_classes > 0,
        include_index=include_index,
        with_contexts=bool(latent_dataset.expected_context_shape(config)),
        label_limit=label_limit,
        where=f"{directory} ({config.data.split})",
        random_flip=bool(config.data.get("random_flip", True)),
    )
    ds = grain.MapDataset.range(per_process // batch).repeat().map_with_index(read)
    if start_step:  # the stream from global step `start_step` on (same batches as a restore)
        ds = ds[start_step:]
    prefetch = max(1, int(config.data.prefetch))
    read_threads = int(config.data.get("read_threads", 2))
    it = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch)
    )
    workers = int(config.data.num_workers)
    if workers > 0:
        _ensure_absl_flags_parsed()
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=prefetch),
            worker_init_fn=functools.partial(exit_with_parent, parent=os.getpid()),
        )
    return it


def make_train_iterator(config: Any, **kwargs: Any) -> grain.DatasetIterator:
    """`iter(make_train_dataset(config, **kwargs))`: save/restore it with
    `grain.checkpoint.CheckpointSave` / `CheckpointRestore` (orbax); restore with the same
    `config.data.num_workers`."""
    return iter(make_train_dataset(config, **kwargs))
