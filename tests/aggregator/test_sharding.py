"""What --workers allows, how its config crosses to a worker, and the coordinator's ledger checks."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import msgpack
import numpy as np
import pytest

from aggregator.aggregation.defence import Defence
from aggregator.config import AggregatorConfig, config_of
from aggregator.coordinator import ingest_source
from aggregator.errors import LedgerMismatch
from aggregator.ingest.pipeline import Ingest
from aggregator.ingest.source import LocalIngest
from aggregator.ingest.validation import limits_for
from aggregator.store import InlineStore, Store
from aggregator.workers.source import WorkerIngest
from fedge_contract import Update
from fedge_contract.codecs import encode_weights, parse_chain
from fedge_contract.mqtt import BrokerAddress
from fedge_contract.tensors import ModelSpec, TensorSpec

BROKER = BrokerAddress.parse("mqtt://user:secret@broker.example:1883")
SPEC = ModelSpec((TensorSpec("w", (3,)),))


@pytest.mark.parametrize(
    "fields, flag",
    [
        ({"mode": "async"}, "--mode async"),
        ({"aggregation": "median"}, "--aggregation mean"),
        ({"aggregation": "krum"}, "--aggregation mean"),
        ({"aggregation": "trimmed_mean"}, "--aggregation mean"),
        ({"clip_norm": "auto:3"}, "--clip-norm auto"),
        ({"workers": -1}, "workers must be >= 0"),
    ],
)
def test_rules_that_do_not_split_into_partial_sums_refuse_workers(fields: dict, flag: str) -> None:
    with pytest.raises(ValueError, match=flag):
        config_of(BROKER, **{"workers": 2, **fields})


def test_fixed_clipping_and_dp_split_fine() -> None:
    pytest.importorskip("opacus")
    config_of(BROKER, workers=2, clip_norm=1.0, clip_action="reject")
    config_of(BROKER, workers=2, clip_norm=1.0, dp_noise=1.0)


def test_the_config_crosses_the_pipe_whole() -> None:
    config = config_of(BROKER, fleet="f1", workers=2, allowed_clients=frozenset({"a", "b"}), training={"lr": 0.1},
                       task_options={"clients": "5"}, store=Path("/tmp/x.sqlite"), clip_norm=2.0)
    assert AggregatorConfig.from_wire(msgpack.unpackb(msgpack.packb(config.to_wire()), raw=False)) == config


def test_workers_pick_the_worker_processes_as_the_ingest_source(tmp_path: Path) -> None:
    with Store(tmp_path / "agg.sqlite") as store:
        for workers, kind in ((2, WorkerIngest), (0, LocalIngest)):
            config = config_of(BROKER, workers=workers)
            assert type(ingest_source(config, _ingest(store), InlineStore(store), SPEC, answered=lambda *a: None)) is kind


def test_a_worker_never_imports_torch() -> None:
    """Workers stay ~40 MiB: importing torch would cost each ~220 MiB and 1.5 s at every (re)start."""
    code = "import sys, aggregator.workers.process; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr


def test_a_worker_without_a_coordinator_says_so() -> None:
    done = subprocess.run([sys.executable, "-m", "aggregator.workers.process"], input=b"", capture_output=True, timeout=60)
    assert done.returncode == 2 and b"started by `fedge aggregator --workers N`" in done.stderr


# ---------------------------------------------------------------------- the coordinator's checks
def _ingest(store: Store) -> Ingest:
    config = config_of(BROKER, workers=2)

    def send(topic: str, payload: bytes) -> None:
        raise AssertionError("nothing is published here")

    return Ingest(fleet="default", spec=SPEC, limits=limits_for(config, SPEC), defence=Defence(config), db=InlineStore(store),
                  send=send, answered=lambda *a: None, log=logging.getLogger("test"))


def _spool(store: Store, update_id: str, client: str, value: float, shard: int) -> None:
    tensors = encode_weights({"w": np.full(3, value, np.float32)}, parse_chain("none"))
    payload = Update("default", client, update_id, 1, 0, 10, tensors).to_bytes()
    store.spool(update_id=update_id, client_id=client, round_no=1, base_version=0, num_samples=10, payload=payload, shard=shard)


async def test_merged_partials_must_match_the_ledger(tmp_path: Path) -> None:
    with Store(tmp_path / "agg.sqlite") as store:
        store.open_round(1, 0, None)
        coordinator, worker = _ingest(store), _ingest(store)
        _spool(store, "u1", "a", 1.0, shard=0)
        _spool(store, "u2", "b", 3.0, shard=1)
        coordinator.refold(store.spooled(1, shard=0))  # worker 0 died: its update is folded here
        worker.refold(store.spooled(1, shard=1))
        partial = msgpack.unpackb(msgpack.packb(worker.partial(), use_bin_type=True), raw=False)
        coordinator.merge(partial)
        await coordinator.check_ledger(1)
        np.testing.assert_array_equal(coordinator.collector.mean()["w"], np.full(3, 2.0, np.float32))
        with pytest.raises(LedgerMismatch, match="folded twice"):
            coordinator.merge(partial)
        _spool(store, "u3", "c", 5.0, shard=1)  # accepted, but in nobody's partial sum
        with pytest.raises(LedgerMismatch, match=r"miss 1 accepted updates \['u3'\]"):
            await coordinator.check_ledger(1)


def test_refolding_skips_what_is_already_folded(tmp_path: Path) -> None:
    with Store(tmp_path / "agg.sqlite") as store:
        store.open_round(1, 0, None)
        ingest = _ingest(store)
        _spool(store, "u1", "a", 1.0, shard=0)
        assert [u.update_id for u in ingest.refold(store.spooled(1))] == ["u1"]  # a restart re-folds the whole spool
        _spool(store, "u2", "b", 3.0, shard=0)
        assert [u.update_id for u in ingest.refold(store.spooled(1, shard=0))] == ["u2"]  # then worker 0 dies
        assert ingest.collector.count == 2
