"""deploy/cluster/emqx/acl.conf grants exactly what broker/mosquitto/production.acl grants.

The expected rules are derived from production.acl (rendered as `fedge broker init` renders it,
for fleet "default"), so the EMQX and Mosquitto ACLs cannot drift apart. Then both are evaluated
on probe requests, first-match for EMQX and allow-list for Mosquitto, against decisions written
by hand from DESIGN.md: a device writes only its own updates (and their chunks) and presence,
reads the global model (and its chunks), the status and its own receipts; in secure-aggregation rounds it
writes only its own protocol messages and reads only the broadcasts and its own key list and bundle.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pytest

from broker.provision import AGGREGATOR_USER
from fedge_contract.secagg import KeyAdvert, MaskedInput, Reveal, Shares
from fedge_contract.secagg.topics import SecAggTopics
from fedge_contract.topics import Topics

ACL_CONF = Path(__file__).resolve().parents[2] / "deploy" / "cluster" / "emqx" / "acl.conf"
FLEET = "default"
GUARD = ("deny", ("username_re", "[^A-Za-z0-9._-]"), "all", "#")  # EMQX-only: see acl.conf
CATCH_ALL_DENY = ("deny", "all", "all", None)


# ---- EMQX acl.conf: the subset of Erlang term syntax EMQX ACL files use --------------------------

class Atom(str):
    """An Erlang atom (a plain ``str`` is an Erlang string)."""


_TOKEN = re.compile(r"""\s+|%[^\n]*|"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|[a-z][A-Za-z0-9_@]*|\d+|[{}\[\],.]""")


def _tokens(text: str) -> list[str]:
    tokens, pos = [], 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if not match:
            raise SyntaxError(f"acl.conf: unexpected {text[pos:pos + 20]!r} at offset {pos}")
        token = match.group()
        if not token.isspace() and not token.startswith("%"):
            tokens.append(token)
        pos = match.end()
    return tokens


def parse_terms(text: str) -> list[object]:
    """The terms of an Erlang consult file (``Term.`` ...): tuples, lists, strings, atoms, integers."""
    tokens = _tokens(text)
    pos = 0

    def term() -> object:
        nonlocal pos
        token = tokens[pos]
        pos += 1
        if token in "{[":
            close, items = "}" if token == "{" else "]", []
            if tokens[pos] != close:
                items.append(term())
                while tokens[pos] == ",":
                    pos += 1
                    items.append(term())
            if tokens[pos] != close:
                raise SyntaxError(f"acl.conf: expected {close!r}, got {tokens[pos]!r}")
            pos += 1
            return tuple(items) if close == "}" else items
        if token.startswith('"'):
            return token[1:-1].encode().decode("unicode_escape")
        if token.startswith("'"):
            return Atom(token[1:-1])
        if token.isdigit():
            return int(token)
        if token[0].isalpha():
            return Atom(token)
        raise SyntaxError(f"acl.conf: unexpected {token!r}")

    terms = []
    try:
        while pos < len(tokens):
            terms.append(term())
            if tokens[pos] != ".":
                raise SyntaxError(f"acl.conf: a rule must end with '.', got {tokens[pos]!r}")
            pos += 1
    except IndexError:
        raise SyntaxError("acl.conf: unexpected end of file") from None
    return terms


def _who(spec: object) -> object:
    if spec == "all" and isinstance(spec, Atom):
        return "all"
    if isinstance(spec, tuple) and len(spec) == 2 and spec[0] in ("username", "user"):
        name = spec[1]
        if isinstance(name, tuple) and len(name) == 2 and name[0] == "re":
            return ("username_re", name[1])
        if isinstance(name, str) and not isinstance(name, Atom):
            return ("username", name)
    raise ValueError(f"acl.conf: unsupported client spec {spec!r}")


def emqx_rules(text: str) -> list[tuple[str, object, str, str | None]]:
    """acl.conf as (permission, who, action, topic) in file order, one per topic."""
    rules: list[tuple[str, object, str, str | None]] = []
    for term in parse_terms(text):
        if not isinstance(term, tuple) or term[0] not in ("allow", "deny"):
            raise ValueError(f"acl.conf: not a rule: {term!r}")
        if len(term) == 2 and term[1] == "all":
            rules.append((str(term[0]), "all", "all", None))
            continue
        if len(term) != 4 or term[2] not in ("publish", "subscribe", "all") or not isinstance(term[3], list):
            raise ValueError(f"acl.conf: unsupported rule {term!r}")
        for topic in term[3]:
            if not isinstance(topic, str) or isinstance(topic, Atom):
                raise TypeError(f"acl.conf: unsupported topic pattern {topic!r} in {term!r}")
            rules.append((str(term[0]), _who(term[1]), str(term[2]), topic))
    return rules


# ---- Mosquitto production.acl ----------------------------------------------------------------------

_ACCESS = {"read": "subscribe", "write": "publish", "readwrite": "all"}


def production_acl_text() -> str:
    template = resources.files("broker").joinpath("mosquitto", "production.acl").read_text()
    return template.format(fleet=FLEET, aggregator=AGGREGATOR_USER)  # as broker.provision.init renders it


def mosquitto_rules(text: str) -> set[tuple[str, object, str, str]]:
    """production.acl's grants, in EMQX's terms: read -> subscribe, write -> publish, %u -> ${username}."""
    rules, user = set(), None
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "user":
            user = ("username", words[1])
            continue
        if words[0] not in ("topic", "pattern") or len(words) not in (2, 3):
            raise ValueError(f"production.acl: unsupported line {line!r}")
        access, topic = (words[1], words[2]) if len(words) == 3 else ("readwrite", words[1])
        if access not in _ACCESS:
            raise ValueError(f"production.acl: unsupported access {access!r} (a deny rule needs a new EMQX rule)")
        if words[0] == "topic":
            if user is None:
                raise ValueError(f"production.acl: {line!r} applies to anonymous clients")
            rules.add(("allow", user, _ACCESS[access], topic))
        else:
            rules.add(("allow", "all", _ACCESS[access], topic.replace("%u", "${username}").replace("%c", "${clientid}")))
    return rules


# ---- one matcher, two ways of deciding -----------------------------------------------------------

def topic_matches(topic: str, pattern: str) -> bool:
    """MQTT matching of ``topic`` against filter ``pattern``. A subscription's own '+'/'#' count as
    plain words: ``receipts/+`` is not inside ``receipts/pi-7``, as EMQX and Mosquitto check it."""
    words, filt = topic.split("/"), pattern.split("/")
    if words[0].startswith("$") and filt[0] in ("+", "#"):
        return False
    for i, f in enumerate(filt):
        if f == "#":
            return True
        if i >= len(words) or (f != "+" and f != words[i]):
            return False
    return len(words) == len(filt)


@dataclass(frozen=True)
class Probe:
    username: str
    action: str  # publish | subscribe
    topic: str
    allowed: bool


def emqx_decides(rules: list[tuple[str, object, str, str | None]], probe: Probe, no_match: str = "deny") -> bool:
    client_id = f"fedge-agent-{probe.username}"
    for permission, who, action, topic in rules:
        if who == "all":
            who_ok = True
        elif who[0] == "username":
            who_ok = who[1] == probe.username
        else:
            who_ok = re.search(who[1], probe.username) is not None
        if not who_ok or action not in ("all", probe.action):
            continue
        if topic is None or topic_matches(probe.topic, topic.replace("${username}", probe.username).replace("${clientid}", client_id)):
            return permission == "allow"
    return no_match == "allow"


def mosquitto_decides(rules: set[tuple[str, object, str, str]], probe: Probe) -> bool:
    for _, who, action, topic in rules:
        if who != "all" and who != ("username", probe.username):
            continue
        if action in ("all", probe.action) and topic_matches(probe.topic, topic.replace("${username}", probe.username)):
            return True
    return False


def probes() -> list[Probe]:
    t, other = Topics(FLEET), Topics("other")
    me, you = "pi-7", "pi-8"
    device = [
        Probe(me, "publish", t.update(me), True),
        Probe(me, "publish", f"{t.update_chunks(me, 'u1')}/0", True),
        Probe(me, "publish", t.presence(me), True),
        Probe(me, "publish", t.evals(me), True),
        Probe(me, "subscribe", t.global_model, True),
        Probe(me, "subscribe", f"{t.global_chunks(3)}/+", True),  # how an agent fetches a chunked model
        Probe(me, "subscribe", f"{t.global_chunks(3)}/0", True),
        Probe(me, "subscribe", t.status, True),
        Probe(me, "subscribe", t.receipt(me), True),
        Probe(me, "publish", t.update(you), False),
        Probe(me, "publish", f"{t.update_chunks(you, 'u1')}/0", False),
        Probe(me, "publish", t.presence(you), False),
        Probe(me, "publish", t.evals(you), False),
        Probe(me, "subscribe", t.evals(me), False),
        Probe(me, "subscribe", t.all_evals, False),
        Probe(me, "publish", t.global_model, False),
        Probe(me, "publish", f"{t.global_chunks(3)}/0", False),
        Probe(me, "publish", t.status, False),
        Probe(me, "publish", t.receipt(me), False),
        Probe(me, "subscribe", t.receipt(you), False),
        Probe(me, "subscribe", f"{t.prefix}/receipts/+", False),
        Probe(me, "subscribe", t.all_updates, False),
        Probe(me, "subscribe", t.update(you), False),
        Probe(me, "subscribe", f"{t.update_chunks(you, 'u1')}/+", False),
        Probe(me, "subscribe", t.all_presence, False),
        Probe(me, "subscribe", f"{t.prefix}/#", False),
        Probe(me, "subscribe", "#", False),
        Probe(me, "subscribe", "$SYS/#", False),
        Probe(me, "publish", other.update(me), False),
        Probe(me, "subscribe", other.global_model, False),
    ]
    aggregator = [
        Probe(AGGREGATOR_USER, "subscribe", t.all_updates, True),
        Probe(AGGREGATOR_USER, "subscribe", t.shared_updates("fedge-default").split("/", 2)[2], True),  # authorized without $share/<group>/
        Probe(AGGREGATOR_USER, "subscribe", f"{t.update_chunks(me, 'u1')}/+", True),
        Probe(AGGREGATOR_USER, "subscribe", t.all_presence, True),
        Probe(AGGREGATOR_USER, "subscribe", t.all_evals, True),
        Probe(AGGREGATOR_USER, "publish", t.global_model, True),
        Probe(AGGREGATOR_USER, "publish", f"{t.global_chunks(3)}/0", True),
        Probe(AGGREGATOR_USER, "publish", f"{t.update_chunks(me, 'u1')}/0", True),  # clears a finished update's chunks
        Probe(AGGREGATOR_USER, "publish", t.receipt(me), True),
        Probe(AGGREGATOR_USER, "publish", t.status, True),
        Probe(AGGREGATOR_USER, "subscribe", other.all_updates, False),
        Probe(AGGREGATOR_USER, "publish", other.global_model, False),
    ]
    return device + aggregator + secagg_probes()


def secagg_probes() -> list[Probe]:
    """Secure aggregation: a device writes only its own protocol messages and reads only its own key list and bundle."""
    s, me, you = SecAggTopics(FLEET), "pi-7", "pi-8"
    device = [Probe(me, "publish", s.device(kind, me), True) for kind in (KeyAdvert, Shares, MaskedInput, Reveal)]
    device += [Probe(me, "publish", s.device(kind, you), False) for kind in (KeyAdvert, Shares, MaskedInput, Reveal)]
    device += [
        Probe(me, "publish", f"{s.masked_chunks(me, 's1')}/0", True),  # a large masked input's chunks
        Probe(me, "publish", f"{s.masked_chunks(you, 's1')}/0", False),
        Probe(me, "subscribe", s.setup, True),
        Probe(me, "subscribe", s.unmask, True),
        Probe(me, "subscribe", s.keys(me), True),
        Probe(me, "subscribe", s.bundle(me), True),
        Probe(me, "subscribe", s.keys(you), False),  # another device's neighbours' keys
        Probe(me, "subscribe", s.bundle(you), False),  # the sealed shares addressed to another device
        Probe(me, "subscribe", f"{s.prefix}/down/+/+", False),
        Probe(me, "subscribe", f"{s.prefix}/down/#", False),
        Probe(me, "subscribe", s.device(Shares, you), False),
        Probe(me, "subscribe", s.all_from_devices, False),
        Probe(me, "subscribe", f"{s.masked_chunks(you, 's1')}/+", False),
        Probe(me, "publish", s.setup, False),
        Probe(me, "publish", s.unmask, False),
        Probe(me, "publish", s.keys(me), False),
        Probe(me, "publish", s.bundle(you), False),
    ]
    aggregator = [
        Probe(AGGREGATOR_USER, "subscribe", s.all_from_devices, True),
        Probe(AGGREGATOR_USER, "subscribe", f"{s.masked_chunks(me, 's1')}/+", True),
        Probe(AGGREGATOR_USER, "publish", f"{s.masked_chunks(me, 's1')}/0", True),  # clears a reassembled input's chunks
        Probe(AGGREGATOR_USER, "publish", s.setup, True),
        Probe(AGGREGATOR_USER, "publish", s.keys(me), True),
        Probe(AGGREGATOR_USER, "publish", s.bundle(me), True),
        Probe(AGGREGATOR_USER, "publish", s.unmask, True),
    ]
    return device + aggregator


# ---- tests -------------------------------------------------------------------------------------

def test_acl_conf_grants_exactly_what_production_acl_grants():
    rules = emqx_rules(ACL_CONF.read_text())
    assert rules[0] == GUARD, "the username guard must come first: the first matching rule decides"
    assert rules[-1] == CATCH_ALL_DENY, "acl.conf must end with {deny, all}"
    allows = [rule for rule in rules[1:-1]]
    assert all(rule[0] == "allow" for rule in allows), "only the guard and the final rule may deny"
    assert len(allows) == len(set(allows)), "duplicate rule"
    assert set(allows) == mosquitto_rules(production_acl_text())


def test_no_mosquitto_placeholder_left():
    text = "\n".join(line for line in ACL_CONF.read_text().splitlines() if not line.lstrip().startswith("%"))
    assert "%u" not in text and "%c" not in text  # EMQX 5 reads them literally: the rule would never match


@pytest.mark.parametrize("probe", probes(), ids=lambda p: f"{p.username}-{p.action}-{p.topic}")
def test_both_acls_decide_as_designed(probe):
    assert emqx_decides(emqx_rules(ACL_CONF.read_text()), probe) is probe.allowed
    assert mosquitto_decides(mosquitto_rules(production_acl_text()), probe) is probe.allowed


@pytest.mark.parametrize("username", ["#", "+", "a/b", "pi 7", "ünï"])
def test_a_username_that_is_no_client_id_gets_nothing(username):
    rules = emqx_rules(ACL_CONF.read_text())
    t = Topics(FLEET)
    for action, topic in [("publish", f"{t.prefix}/updates/{username}"), ("subscribe", t.global_model),
                          ("publish", t.update("pi-7")), ("subscribe", t.receipt("pi-7"))]:
        assert not emqx_decides(rules, Probe(username, action, topic, False))


def test_parser_rejects_what_emqx_would_reject():
    with pytest.raises(SyntaxError):
        parse_terms('{allow, all, publish, ["a"]}')  # no terminating '.'
    with pytest.raises(SyntaxError):
        parse_terms('{allow, all, publish, ["a"}.')
    with pytest.raises(ValueError):
        emqx_rules('{allow, all, publsh, ["a"]}.')
