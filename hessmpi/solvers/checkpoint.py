"""Checkpoints of the solvers (spectrum, density): results files that hold a run's progress.

A checkpoint is used only by the run that wrote it: its root attributes must hold the
run's `identity` (the settings that define the run) and /model/params its θ. It may hold
the products of a unit of work (an eigen solver's pass, a Lanczos probe) that a stop
request interrupted, as full vectors with the digests of the vectors multiplied
(`products_datasets`); a run on as many ranks retraces them (`petsc.replay`).
"""

from __future__ import annotations

import os

import numpy as np

from .. import results
from ..errors import HessmpiError


IDENTITY = ("model", "dataset", "data_fingerprint", "n_samples", "dtype", "loss", "operator", "layer")


def identity(attrs: dict, n: int, checkpoint: str | None, **settings) -> dict:
    """What defines a run for its checkpoint: the root attributes of its operator (attrs, as
    spectrum.operator_attrs gives them) that name the model, the data and the curvature,
    the operator's size n, and the run's settings. HessmpiError if a checkpoint is asked for
    an operator that is no problem's curvature (which these would not identify)."""
    if checkpoint and attrs["operator"] not in ("hessian", "ggn"):
        raise HessmpiError("a checkpoint needs a problem's curvature (hessmpi.Hessian or GGN, or a block of one), "
                           "not a sum with other terms")
    return {**{key: attrs.get(key) for key in IDENTITY}, "operator_size": n, **settings}


def discard(path: str | None, comm) -> None:
    """Remove a finished run's checkpoint, if it has one (rank 0 of comm; any rank if comm is None)."""
    if path and (comm is None or comm.Get_rank() == 0) and os.path.exists(path):
        os.unlink(path)


def read(path: str, identity: dict, theta: np.ndarray, marker: str, comm, what: str = "--checkpoint"):
    """(datasets, attrs) of the checkpoint at path on every rank, or None if there is none.
    Rank 0 reads; a file that is unreadable, lacks the dataset `marker` (another kind of
    file) or belongs to another run raises the same HessmpiError on every rank. Collective."""
    loaded = None
    if comm.Get_rank() == 0 and os.path.exists(path):
        try:
            loaded = _read(path, identity, theta, marker, what)
        except HessmpiError as e:
            loaded = str(e)
    loaded = comm.bcast(loaded)
    if isinstance(loaded, str):
        raise HessmpiError(loaded, collective=True)
    return loaded


def _read(path, identity, theta, marker, what):
    try:
        datasets, attrs = results.read(path)
    except HessmpiError as e:
        raise HessmpiError(f"{what} {path}: {e}") from None
    if marker not in datasets:
        raise HessmpiError(f"{what} {path} is not a checkpoint of this kind of run; choose another file")
    differ = [f"{name} {attrs.get(name)!r} there, {value!r} here" for name, value in identity.items()
              if attrs.get(name) != value]
    if not np.array_equal(datasets.get("model/params"), theta):
        differ.append("other weights")
    if differ:
        raise HessmpiError(f"{what} {path} was written by a different run ({'; '.join(differ)}); "
                           f"delete it to start afresh, or pass another {what}")
    return datasets, attrs


def products_datasets(products, comm, n: int) -> dict:
    """The datasets of recorded products (petsc.retraceable: (digest, this rank's rows) each), on
    rank 0: checkpoint/replay_products (k × n) and checkpoint/replay_digests (ranks × k × 16
    bytes); {} on the other ranks. Collective."""
    mine = (np.array([y for _, y in products]).reshape(len(products), -1) if products else np.zeros((0, 0)),
            np.array([np.frombuffer(d, dtype=np.uint8) for d, _ in products], dtype=np.uint8).reshape(-1, 16))
    gathered = comm.gather(mine, root=0)  # one collective for all of them
    if comm.Get_rank() != 0:
        return {}
    return {"checkpoint/replay_products": np.hstack([rows for rows, _ in gathered]).reshape(len(products), n),
            "checkpoint/replay_digests": np.array([d for _, d in gathered]).reshape(comm.Get_size(), len(products), 16)}


def products_of_rank(datasets: dict, comm, lo: int, hi: int, log) -> list:
    """This rank's part (rows lo:hi) of the products a checkpoint holds, to `petsc.replay`; none
    if it holds none, or if they were made on another number of ranks (whose vectors differ
    in their last bits: the interrupted work is then done again, and log says so)."""
    products = datasets.get("checkpoint/replay_products", np.zeros((0, 0)))
    digests = datasets.get("checkpoint/replay_digests", np.zeros((comm.Get_size(), 0, 16), dtype=np.uint8))
    if not len(products):
        return []
    if digests.shape[0] != comm.Get_size():
        log(f"the checkpoint's {len(products)} products of the interrupted work were made on {digests.shape[0]} "
            f"ranks, this run has {comm.Get_size()}: that work is done again")
        return []
    rank = comm.Get_rank()
    return [(digests[rank, j].tobytes(), products[j, lo:hi].copy()) for j in range(len(products))]
