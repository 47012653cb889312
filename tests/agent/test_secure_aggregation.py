"""The agent's secure-aggregation module at unit level: a recording publisher in place of MQTT, the pure
ServerSession as the aggregator. Joining, sitting out with a reason, stale messages, restarts."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from edge_agent.secure_aggregation import SecureAggregation, TrainedInput
from edge_agent.secure_rounds import EXTRA_KEY as AGENT_EXTRA_KEY
from edge_agent.secure_rounds import Unavailable, is_secure
from fedge_contract import GlobalModel, TaskConfig
from fedge_contract.secagg import KeyAdvert, KeyList, ServerSession, Setup, Shares, new_session_id
from fedge_contract.secagg.announcement import EXTRA_KEY, SecureRound
from fedge_contract.tensors import ModelSpec

FLEET = "lab"
SPEC = ModelSpec.of({"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32)})


class Recorder:
    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self.published.append((topic, payload))


def _module(state: Path, client: str = "dev-0") -> tuple[SecureAggregation, Recorder]:
    recorder = Recorder()
    module = SecureAggregation(fleet=FLEET, client_id=client, state_dir=state, max_message_bytes=1 << 20, random=random.Random(1).randbytes)
    module.attach(recorder, SPEC)
    return module, recorder


def _model(round_no: int = 1, extra: object = None) -> GlobalModel:
    task = TaskConfig(codec="none", extra={EXTRA_KEY: extra} if extra is not None else SecureRound().to_extra())
    return GlobalModel(FLEET, round_no - 1, round_no, None, task, SPEC.fingerprint, ())


def _setup(round_no: int = 1, length: int = SPEC.num_parameters + 1, seed: int = 0) -> Setup:
    return Setup(fleet=FLEET, round=round_no, session=new_session_id(random.Random(seed).randbytes), sender="aggregator",
                 cohort=("dev-0", "dev-1", "dev-2", "dev-3"), degree=4, threshold=2, min_survivors=3, ring_bits=32, length=length, clip=8.0)


def _delta() -> dict[str, np.ndarray]:
    return {"w": np.full((4, 3), 0.1, np.float32), "b": np.full(3, -0.2, np.float32)}


async def test_a_setup_naming_the_device_starts_a_session_whose_advert_goes_to_its_own_topic(tmp_path: Path) -> None:
    module, recorder = _module(tmp_path)
    setup = _setup()
    await module.on_message(module.topics.setup, setup.to_bytes())  # before the announcement: it waits for it
    assert recorder.published == [] and module.session is None
    await module.on_announcement(_model())
    ((topic, payload),) = recorder.published
    assert topic == module.topics.device(KeyAdvert, "dev-0") and KeyAdvert.from_bytes(payload).session == setup.session
    await module.on_message(module.topics.setup, setup.to_bytes())  # re-delivered on a reconnect: the same advert again
    assert recorder.published[1] == recorder.published[0]
    assert module.presence_fields() == {} and module.stats.joined == 1


async def test_a_setup_for_a_shape_the_device_does_not_have_is_sat_out_with_the_reason_in_presence(tmp_path: Path) -> None:
    module, recorder = _module(tmp_path)
    await module.on_announcement(_model())
    await module.on_message(module.topics.setup, _setup(length=99).to_bytes())
    assert recorder.published == [] and module.session is None
    assert "shape_mismatch" in module.presence_fields()["secagg"] and "99 coordinates" in module.presence_fields()["secagg"]


async def test_a_refused_message_means_sitting_the_session_out_and_a_stale_one_is_ignored(tmp_path: Path) -> None:
    module, recorder = _module(tmp_path)
    setup = _setup()
    server = ServerSession(setup, now=0.0, random=random.Random(2).randbytes)
    peers = {c: SecureAggregation(fleet=FLEET, client_id=c, state_dir=tmp_path / c, max_message_bytes=1 << 20) for c in setup.cohort[1:]}
    await module.on_announcement(_model())
    await module.on_message(module.topics.setup, setup.to_bytes())
    server.handle(KeyAdvert.from_bytes(recorder.published[0][1]), now=0.0)
    sends: list = []
    for peer in peers.values():
        peer.attach(Recorder(), SPEC)
        await peer.on_announcement(_model())
        await peer.on_message(peer.topics.setup, setup.to_bytes())
        sends += server.handle(KeyAdvert.from_bytes(peer._publisher.published[0][1]), now=0.0).send  # type: ignore[union-attr]
    key_list = next(m for m in sends if isinstance(m, KeyList) and m.recipient == "dev-0")

    stale = KeyList(**{**key_list.__dict__, "session": "an-older-one"})
    await module.on_message(module.topics.keys("dev-0"), stale.to_bytes())  # another session's retained message: ignored quietly
    assert module.session is not None and module.presence_fields() == {}

    await module.on_message(module.topics.keys("dev-0"), key_list.to_bytes())
    assert recorder.published[-1][0] == module.topics.device(Shares, "dev-0")
    changed = KeyList(**{**key_list.__dict__, "graph_seed": bytes(32)})  # a second, different key list: refused
    await module.on_message(module.topics.keys("dev-0"), changed.to_bytes())
    assert module.session is None
    assert module.presence_fields()["secagg"].startswith(f"sat out session {setup.session} of round 1: conflict")
    published = len(recorder.published)
    await module.on_message(module.topics.setup, setup.to_bytes())  # the retained setup again: the device stays out
    await module.on_message(module.topics.keys("dev-0"), key_list.to_bytes())
    assert len(recorder.published) == published and len(module.stats.sat_out) == 1


async def test_a_restarted_device_sits_out_the_session_it_joined_and_keeps_its_trained_delta(tmp_path: Path) -> None:
    module, recorder = _module(tmp_path)
    setup = _setup()
    await module.on_announcement(_model())
    await module.submit(_model(), _delta(), 40)
    await module.on_message(module.topics.setup, setup.to_bytes())
    assert len(recorder.published) == 1

    again, recorder = _module(tmp_path)  # the agent restarted: the session's keys are gone, the journal and the input are not
    await again.on_announcement(_model())
    await again.on_message(again.topics.setup, setup.to_bytes())
    assert recorder.published == [] and again.session is None
    assert "before a restart" in again.presence_fields()["secagg"]
    kept = again._input
    assert kept is not None and kept.num_samples == 40 and np.array_equal(kept.delta["b"], _delta()["b"])

    retry = _setup(seed=1)  # the round retried as a new session: the device joins it with the kept delta
    await again.on_message(again.topics.setup, retry.to_bytes())
    assert again.session is not None and again.session.setup == retry and again.presence_fields() == {}


async def test_a_newer_round_drops_the_older_input_and_an_unreadable_input_file_is_ignored(tmp_path: Path) -> None:
    module, _ = _module(tmp_path)
    await module.on_announcement(_model())
    await module.submit(_model(), _delta(), 40)
    path = tmp_path / "secagg" / "input.bin"
    assert TrainedInput.from_bytes(path.read_bytes(), SPEC).round == 1
    await module.on_announcement(_model(2))
    assert module._input is None and not path.exists()

    path.write_bytes(b"\x93garbage")
    again, _ = _module(tmp_path)
    assert again._input is None  # a warning, no crash: the device sits the round out at worst
    with pytest.raises(ValueError):
        TrainedInput.from_bytes(TrainedInput(1, 0, 5, {"other": np.zeros(2, np.float32)}).to_bytes(), SPEC)


async def test_unusable_secure_parameters_in_the_announcement_are_reported_and_never_fall_back_to_a_plain_update(tmp_path: Path) -> None:
    module, recorder = _module(tmp_path)
    model = _model(extra={"max_weight": -1})
    assert is_secure(model)  # the agent keeps the delta away from its outbox
    await module.on_announcement(model)
    assert "unusable" in module.presence_fields()["secagg"]
    await module.on_message(module.topics.setup, _setup().to_bytes())
    assert recorder.published == [] and module.session is None


def test_the_agent_s_copy_of_the_announcement_key_is_the_contract_s() -> None:
    assert AGENT_EXTRA_KEY == EXTRA_KEY


async def test_a_device_without_cryptography_sits_secure_rounds_out_and_says_why() -> None:
    changed: list[str] = []
    hook = Unavailable("dev-0", "secure aggregation needs the 'cryptography' package", on_change=lambda: _note(changed))
    assert hook.subscriptions() == [] and not hook.owns("fl/lab/secagg/down/setup")
    await hook.on_announcement(GlobalModel(FLEET, 0, 1, None, TaskConfig(), SPEC.fingerprint, ()))  # a plain round: nothing to say
    assert hook.presence_fields() == {} and changed == []
    await hook.on_announcement(_model())
    await hook.on_announcement(_model())  # the same round again: reported once
    assert "sits out secure round 1" in hook.presence_fields()["secagg"] and changed == ["presence"]


async def _note(changed: list[str]) -> None:
    changed.append("presence")


def test_the_agent_builds_the_unavailable_hook_where_cryptography_is_missing(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = f"""
import importlib.abc, sys
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "cryptography":
            raise ImportError("cryptography is not installed on a device")
sys.meta_path.insert(0, Refuse())
from pathlib import Path
from edge_agent.secure_rounds import Unavailable, secure_aggregation
hook = secure_aggregation(fleet="lab", client_id="pi-1", state_dir=Path({str(tmp_path)!r}), max_message_bytes=1024, seed=0)
print(type(hook).__name__, "fedge[secagg]" in hook.reason)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["Unavailable", "True"]
