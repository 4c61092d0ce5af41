"""A hospital's personal model: trained at the hospital, kept in its state folder, never sent.

Personalised federated learning (run settings ``personal.*``, :class:`shared_models.config.
PersonalConfig`) gives each hospital a model of its own next to the global one:

- ``finetune``: at each evaluation, the global model fine-tuned on the hospital's training split
  (Wang et al. 2019, "Federated evaluation of on-device personalization", arXiv:1910.10252;
  Yu, Bagdasaryan & Shmatikov 2020, arXiv:2002.04758);
- ``ditto``: a personal model ``v`` trained every round on the hospital's data with the proximal
  term ``lambda/2 ||v - w_global||^2`` towards the round's global weights, carried from round to
  round (Li, Hu, Beirami & Smith, "Ditto: Fair and robust federated learning through
  personalization", ICML 2021, arXiv:2012.04221, Algorithm 1 with the global update left to the
  run's Flower strategy).

Privacy: the personal model trains without DP because nothing of it leaves the hospital: it is
written to ``<state folder>/personal/<run id>.safetensors`` (folder mode 0700, file 0600), never
put in a reply. What leaves is, as for the global model, its evaluation on the hospital's test
split: exact metrics where the hospital policy allows them, else noisy score histograms charged to
the run's accountant (:func:`client.client_app._release_privately`, one more release per
evaluation, planned in the run's budget by :attr:`shared_models.config.RunConfig.
releases_per_evaluation`). A hospital without a state folder (a simulation without ledgers) keeps
the personal weights in its node's ``Context.state``, which the SuperNode keeps in memory.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Dataset

from client.ledger import Ledger
from client.training import steps_per_round, train_round
from shared_models.config import PersonalConfig
from shared_models.files import fsync_folder

_STATE_KEY = "fedcare.personal"


def personal_file(ledger: Ledger, run_key: str) -> Path:
    """``<state folder>/personal/<run_key>.safetensors`` (the run id is checked as the ledger's).

    Raises
    ------
    client.ledger.LedgerError
        ``run_key`` is not a valid ledger key (it cannot name a file outside the folder).
    """
    ledger.path(run_key)  # validates the id
    return ledger.root / "personal" / f"{run_key}.safetensors"


def load_personal(model: nn.Module, ledger: Ledger | None, context: Context, run_key: str) -> bool:
    """Load this hospital's personal weights of ``run_key`` into ``model``; False if it has none
    (or the stored weights no longer fit the model, e.g. the run's model changed)."""
    if ledger is not None:
        path = personal_file(ledger, run_key)
        if not path.exists():
            return False
        state = load_file(str(path))
    else:
        record = context.state.get(_STATE_KEY)
        if not isinstance(record, ArrayRecord) or context.state.get(_STATE_KEY + ".run") is None:
            return False
        if str(context.state[_STATE_KEY + ".run"]["id"]) != run_key:  # type: ignore[index]
            return False
        state = record.to_torch_state_dict()
    try:
        model.load_state_dict(state)
    except RuntimeError:
        return False
    return True


def save_personal(model: nn.Module, ledger: Ledger | None, context: Context, run_key: str) -> None:
    """Keep ``model``'s weights as this hospital's personal model of ``run_key``: in the state
    folder (written to a temporary name, fsynced and renamed, so a crash keeps the previous
    version), else in the node's ``Context.state``."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if ledger is None:
        from flwr.app import ConfigRecord

        context.state[_STATE_KEY] = ArrayRecord(state)  # type: ignore[arg-type]
        context.state[_STATE_KEY + ".run"] = ConfigRecord({"id": run_key})
        return
    path = personal_file(ledger, run_key)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp))
    os.chmod(tmp, 0o600)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_folder(path.parent)


def train_personal(
    model: nn.Module,
    data: Dataset,
    n_train: int,
    *,
    config: PersonalConfig,
    global_weights: Mapping[str, torch.Tensor] | None,
    seed: int,
    device: str,
) -> float:
    """Train ``model`` (the personal model, in place) for ``config.epochs`` local epochs of SGD
    without DP (it never leaves the hospital).

    Parameters
    ----------
    model : nn.Module
        The personal model: maps ``[B, *input_shape]`` to logits ``[B]``.
    data : Dataset
        The hospital's training split, as for :func:`client.training.train_round`.
    n_train : int
        Its number of records.
    config : PersonalConfig
        ``epochs``, ``lr``, ``batch_size``; ``lam`` for Ditto.
    global_weights : mapping of str to Tensor, optional
        Ditto: the round's global weights, the proximal term's anchor
        (``v -= lr * lambda * (v - w_global)`` after each step). None: plain fine-tuning.
    seed : int
        Batch order.
    device : str
        Torch device.

    Returns
    -------
    float
        The mean training loss of the last steps (stays at the hospital).
    """
    steps = steps_per_round(n_train, config.batch_size, config.epochs)
    result = train_round(
        model,
        data,
        steps=steps,
        batch_size=config.batch_size,
        lr=config.lr,
        dp=None,
        proximal_mu=config.lam if global_weights is not None else 0.0,
        proximal_anchor=global_weights,
        seed=seed,
        device=device,
    )
    return result.loss
