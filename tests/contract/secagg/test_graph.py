"""The neighbourhood graph: the same for everyone with the same seed, k-regular, symmetric, complete when small."""

from __future__ import annotations

import pytest

from fedge_contract.secagg.errors import ParameterError
from fedge_contract.secagg.graph import Graph

MEMBERS = tuple(sorted(f"agent-{i}" for i in range(40)))


def test_same_seed_same_graph_and_another_seed_another() -> None:
    a, b, c = Graph(MEMBERS, 8, b"\x01" * 32), Graph(MEMBERS, 8, b"\x01" * 32), Graph(MEMBERS, 8, b"\x02" * 32)
    assert all(a.neighbours(m) == b.neighbours(m) for m in MEMBERS)
    assert any(a.neighbours(m) != c.neighbours(m) for m in MEMBERS)


@pytest.mark.parametrize("degree", [2, 4, 8, 14])
def test_every_member_has_k_neighbours_and_neighbourhood_is_mutual(degree: int) -> None:
    graph = Graph(MEMBERS, degree, b"\x03" * 32)
    for member in MEMBERS:
        neighbours = graph.neighbours(member)
        assert len(neighbours) == degree and member not in neighbours
        assert all(member in graph.neighbours(n) for n in neighbours)


def test_a_small_cohort_gets_the_complete_graph() -> None:
    members = MEMBERS[:9]
    graph = Graph(members, 8, b"\x04" * 32)
    assert graph.effective_degree == 8
    assert all(graph.neighbours(m) == set(members) - {m} for m in members)
    smaller = Graph(members[:5], 8, b"\x04" * 32)
    assert smaller.effective_degree == 4 and smaller.neighbours(members[0]) == set(members[1:5])


def test_share_points_are_positions_from_one() -> None:
    graph = Graph(MEMBERS, 4, b"\x05" * 32)
    assert [graph.index(m) for m in MEMBERS] == list(range(1, 41))
    with pytest.raises(ParameterError):
        graph.index("stranger")
    with pytest.raises(ParameterError):
        graph.neighbours("stranger")


@pytest.mark.parametrize(
    ("members", "degree", "seed"),
    [(("b", "a"), 2, b"\x00" * 32), (("a", "a"), 2, b"\x00" * 32), (MEMBERS, 3, b"\x00" * 32), (MEMBERS, 0, b"\x00" * 32), (MEMBERS, 4, b"short")],
)
def test_malformed_graphs_are_refused(members: tuple[str, ...], degree: int, seed: bytes) -> None:
    with pytest.raises(ParameterError):
        Graph(members, degree, seed)
