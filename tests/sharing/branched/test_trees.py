"""Trees of branched multi-task networks: the bmtas config format, enumeration, cost, size, the exhaustive and
beam searches under a parameter budget, and tree.json."""

import json

import numpy as np
import pytest

from mtl_med.sharing.branched.trees import (
    TreeSearchResult,
    budget_from_fraction,
    canonical_tree,
    enumerate_trees,
    load_tree_json,
    save_tree_json,
    search_beam,
    search_exhaustive,
    tree_cost,
    tree_mappings,
    tree_num_branches,
    tree_params,
    tree_partitions,
)

BMTAS_EXAMPLE = [[0, 0, 0, 0], [2, 2, 2, 2], [1, 1, 2, 2], [0, 0, 2, 3], [0, 1, 2, 3], [1, 1, 3, 3]]


def _dis(*blocks):
    """(L, 3, 3) dissimilarity from per-block (ab, ac, bc)."""
    d = np.zeros((len(blocks), 3, 3))
    for l, (ab, ac, bc) in enumerate(blocks):
        d[l, 0, 1] = d[l, 1, 0] = ab
        d[l, 0, 2] = d[l, 2, 0] = ac
        d[l, 1, 2] = d[l, 2, 1] = bc
    return d


def _random_dis(rng, num_blocks, num_tasks):
    d = rng.uniform(0.0, 2.0, (num_blocks, num_tasks, num_tasks))
    d = (d + d.transpose(0, 2, 1)) / 2
    for block in d:
        np.fill_diagonal(block, 0.0)
    return d


def _key(config):
    return tuple(map(tuple, config))


# ------------------------------------------------------------------------------------------- config format
def test_bmtas_example_partitions_mappings_and_branches():
    assert canonical_tree(BMTAS_EXAMPLE) == [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 1, 2], [0, 1, 2, 3], [0, 1, 2, 3]]
    assert tree_partitions(BMTAS_EXAMPLE) == [
        [(0, 1, 2, 3)],
        [(0, 1, 2, 3)],
        [(0, 1), (2, 3)],
        [(0, 1), (2,), (3,)],
        [(0,), (1,), (2,), (3,)],
        [(0,), (1,), (2,), (3,)],
    ]
    assert tree_mappings(BMTAS_EXAMPLE) == [
        {0: [0]},
        {0: [0]},
        {0: [0, 1]},
        {0: [0], 1: [1, 2]},
        {0: [0, 1], 1: [2], 2: [3]},
        {0: [0], 1: [1], 2: [2], 3: [3]},
    ]
    assert tree_num_branches(BMTAS_EXAMPLE) == [1, 1, 2, 3, 4, 4]
    # hard sharing is the all-zeros config; single task is one branch per task from the root on
    assert tree_mappings([[0, 0, 0]] * 2) == [{0: [0]}, {0: [0]}]
    assert tree_mappings([[0, 1, 2]] * 2) == [{0: [0, 1, 2]}, {0: [0], 1: [1], 2: [2]}]


def test_canonicalisation_refines_by_earlier_rows_and_relabels_by_first_appearance():
    # a later row cannot re-merge tasks an earlier row split
    assert canonical_tree([[0, 0, 1], [0, 0, 0]]) == [[0, 0, 1], [0, 0, 1]]
    # crossing groupings intersect: {01}{23} then {02}{13} -> singletons
    assert canonical_tree([[0, 0, 1, 1], [0, 1, 0, 1]]) == [[0, 0, 1, 1], [0, 1, 2, 3]]
    assert tree_mappings([[0, 0, 1, 1], [0, 1, 0, 1]]) == [{0: [0, 1]}, {0: [0, 1], 1: [2, 3]}]
    # label values and their order are irrelevant; numpy input is accepted
    assert canonical_tree(np.array([[7, 7, -3], [5, 4, 9]])) == [[0, 0, 1], [0, 1, 2]]
    assert canonical_tree([[2.0, 1.0]]) == [[0, 1]]
    rng = np.random.default_rng(0)
    for _ in range(50):
        config = rng.integers(0, 4, (4, 5))
        canon = canonical_tree(config)
        assert canonical_tree(canon) == canon
        relabelled = [[10 * x + 3 for x in row] for row in config]
        assert canonical_tree(relabelled) == canon
        for upper, lower in zip(tree_partitions(canon), tree_partitions(canon)[1:]):
            assert all(any(set(g) <= set(h) for h in upper) for g in lower)


@pytest.mark.parametrize("bad", [[], [0, 1], [[0, 1], [0]], [[0.5, 1]], [[True, False]], [["a", "b"]], [[0, np.nan]]])
def test_malformed_configs_are_refused(bad):
    with pytest.raises(ValueError, match="config"):
        canonical_tree(bad)


# ---------------------------------------------------------------------------------------------- enumeration
# number of trees, N tasks x k branchable blocks after a shared first block (chains of refining partitions)
TREE_COUNTS = {
    2: [2, 3, 4, 5],
    3: [5, 12, 22, 35],
    4: [15, 60, 154, 315],
    5: [52, 358, 1304, 3455],
    6: [203, 2471, 12915, 44590],
}


@pytest.mark.parametrize("num_tasks", sorted(TREE_COUNTS))
def test_tree_counts(num_tasks):
    for k, count in enumerate(TREE_COUNTS[num_tasks], start=1):
        trees = enumerate_trees(num_tasks, k + 1, first_shared=1)
        assert len(trees) == count, (num_tasks, k)
        if count < 5000:
            assert len(enumerate_trees(num_tasks, k, first_shared=0)) == count
            assert len({_key(t) for t in trees}) == count
            assert all(t[0] == [0] * num_tasks and canonical_tree(t) == t for t in trees)


def test_enumeration_respects_first_shared():
    assert enumerate_trees(3, 2, first_shared=2) == [[[0, 0, 0], [0, 0, 0]]]
    trees = enumerate_trees(3, 3, first_shared=2)
    assert len(trees) == 5 and all(t[:2] == [[0, 0, 0]] * 2 for t in trees)
    assert enumerate_trees(1, 3) == [[[0], [0], [0]]]
    with pytest.raises(ValueError, match="first_shared"):
        enumerate_trees(3, 2, first_shared=3)


# ------------------------------------------------------------------------------------------- cost and size
WORKED = _dis((0.1, 0.5, 0.6), (0.3, 0.9, 0.8))  # tasks a, b, c; two branchable blocks of 1 and 2 parameters
WORKED_TABLE = {  # (P1 ; P2) -> (cost, params)
    ((0, 0, 0), (0, 0, 0)): (1.50, 3),
    ((0, 0, 0), (0, 0, 1)): (0.75, 5),
    ((0, 0, 0), (0, 1, 1)): (1.00, 5),
    ((0, 0, 0), (0, 1, 0)): (1.05, 5),
    ((0, 0, 1), (0, 0, 1)): (0.20, 6),
    ((0, 1, 1), (0, 1, 1)): (0.70, 6),
    ((0, 0, 0), (0, 1, 2)): (0.60, 7),
    ((0, 0, 1), (0, 1, 2)): (0.05, 8),
    ((0, 1, 2), (0, 1, 2)): (0.00, 9),
    # the three trees not listed in the worked example, by hand
    ((0, 1, 0), (0, 1, 0)): (0.70, 6),
    ((0, 1, 0), (0, 1, 2)): (0.25, 8),
    ((0, 1, 1), (0, 1, 2)): (0.30, 8),
}
WORKED_BEST = {3: (0, 0, 0, 0, 0, 0), 4: (0, 0, 0, 0, 0, 0), 5: (0, 0, 0, 0, 0, 1), 6: (0, 0, 1, 0, 0, 1),
               7: (0, 0, 1, 0, 0, 1), 8: (0, 0, 1, 0, 1, 2), 9: (0, 1, 2, 0, 1, 2)}


def test_worked_example_table():
    for key, (cost, params) in WORKED_TABLE.items():
        assert tree_cost(key, WORKED) == pytest.approx(cost)
        assert tree_params(key, [1, 2]) == params
    result = search_exhaustive(WORKED, [1, 2], budget=9, first_shared=0)
    assert {_key(s.config): (pytest.approx(s.cost), s.params) for s in result.table} == WORKED_TABLE


@pytest.mark.parametrize("search", [search_exhaustive, search_beam])
def test_worked_example_best_tree_per_budget(search):
    for budget, best in WORKED_BEST.items():
        result = search(WORKED, [1, 2], budget, first_shared=0)
        assert isinstance(result, TreeSearchResult)
        assert result["config"] == result.config and result.get("table") is result.table and result.get("x") is None
        assert tuple(sum(result.config, [])) == best, budget
        cost, params = WORKED_TABLE[_key(result.config)]
        assert result.cost == pytest.approx(cost) and result.params == params and result.budget == budget
    picks = {_key(search(WORKED, [1, 2], b, first_shared=0).config) for b in (5, 6, 8)}
    assert len(picks) == 3
    # the table holds over-budget trees too (exhaustive), or the last step's candidates (beam)
    assert len(search_exhaustive(WORKED, [1, 2], 5, first_shared=0).table) == 12


def test_cost_is_not_monotone_under_refinement():
    d = np.ones((1, 5, 5))
    np.fill_diagonal(d[0], 0.0)
    d[0, 4, :4] = d[0, :4, 4] = 0.2
    assert tree_cost([[0, 0, 0, 0, 1]], d) == pytest.approx(0.5)  # {abcd}{e}
    assert tree_cost([[0, 0, 1, 1, 2]], d) == pytest.approx(2 / 3)  # {ab}{cd}{e}, a refinement, costs more


def test_cost_averages_cluster_maxima_with_singletons_as_zero():
    d = _dis((0.2, 0.4, 0.8))
    assert tree_cost([[0, 0, 0]], d) == pytest.approx(0.8)
    assert tree_cost([[0, 1, 0]], d) == pytest.approx(0.4 / 2)
    assert tree_cost([[0, 1, 2]], d) == 0.0
    # block l's grouping is scored with dissimilarity[l] only
    assert tree_cost([[0, 0, 0], [0, 0, 1]], np.stack([d[0], 2 * d[0]])) == pytest.approx(0.8 + 0.4 / 2)
    with pytest.raises(ValueError, match="2 blocks and 3 tasks"):
        tree_cost([[0, 0, 0], [0, 0, 1]], d)


def test_params_and_budget_fractions():
    p = [10, 20, 40]
    assert tree_params([[0, 0, 0]] * 3, p, fixed_params=5) == 75
    assert tree_params(BMTAS_EXAMPLE[:3], p) == 10 + 20 + 2 * 40
    assert budget_from_fraction(0, p, 3, fixed_params=5) == 75
    assert budget_from_fraction(1, p, 3, fixed_params=5) == 5 + 10 + 3 * 60
    assert budget_from_fraction(0.5, p, 3, fixed_params=5) == (75 + 195) / 2
    assert budget_from_fraction(1, p, 3, first_shared=0) == 3 * 70
    rng = np.random.default_rng(1)
    d = _random_dis(rng, 3, 3)
    hard = search_exhaustive(d, p, budget_from_fraction(0, p, 3, fixed_params=5), fixed_params=5)
    single = search_exhaustive(d, p, budget_from_fraction(1, p, 3, fixed_params=5), fixed_params=5)
    assert hard.config == [[0, 0, 0]] * 3 and hard.params == 75
    assert single.config == [[0, 0, 0], [0, 1, 2], [0, 1, 2]] and single.params == 195
    for search in (search_exhaustive, search_beam):
        assert search(d, p, budget_from_fraction(0, p, 3)).config == hard.config
        assert search(d, p, budget_from_fraction(1, p, 3)).config == single.config
    with pytest.raises(ValueError, match="fraction"):
        budget_from_fraction(1.5, p, 3)


def test_equal_costs_go_to_the_smaller_tree():
    zero = np.zeros((3, 4, 4))
    for search in (search_exhaustive, search_beam):
        result = search(zero, [1, 1, 1], budget=100)
        assert result.config == [[0] * 4] * 3 and result.params == 3


# --------------------------------------------------------------------------------------------------- search
def test_exhaustive_is_the_best_tree_within_budget():
    rng = np.random.default_rng(2)
    d, p = _random_dis(rng, 3, 4), [3, 2, 5]
    full = search_exhaustive(d, p, budget=10**6, fixed_params=7)
    assert len(full.table) == 60
    for budget in sorted({s.params for s in full.table}):
        result = search_exhaustive(d, p, budget, fixed_params=7)
        fits = [s for s in full.table if s.params <= budget]
        assert result.params <= budget and result.cost == pytest.approx(min(s.cost for s in fits))
        assert result.cost == pytest.approx(tree_cost(result.config, d)) and result.params == tree_params(result.config, p, 7)


def test_beam_equals_exhaustive_when_the_candidates_cover_the_optimum():
    # With at most three tasks and one pair that is the closest at every block, every optimal tree uses only
    # the groupings spectral clustering proposes and the beam holds every partial tree: the searches agree
    # for every budget. With two tasks there is nothing to cluster.
    for seed in range(4):
        rng = np.random.default_rng(seed)
        for num_tasks in (2, 3):
            d = _random_dis(rng, 3, num_tasks)
            if num_tasks == 3:  # make tasks i, j the closest pair at every block
                i, j, k = rng.permutation(3)
                d[:, i, j] = d[:, j, i] = 0.5 * np.minimum(d[:, i, k], d[:, j, k])
            p = rng.integers(1, 5, 3)
            full = search_exhaustive(d, p, 10**6, first_shared=0)
            for budget in sorted({s.params for s in full.table}):
                exhaustive = search_exhaustive(d, p, budget, first_shared=0)
                beam = search_beam(d, p, budget, first_shared=0, seed=seed)
                assert beam.config == exhaustive.config and beam.params == exhaustive.params, (seed, num_tasks, budget)
                assert beam.cost == pytest.approx(exhaustive.cost)


def test_beam_never_beats_exhaustive_and_its_trees_are_scored_right():
    for seed in range(3):
        rng = np.random.default_rng(10 + seed)
        d, p = _random_dis(rng, 3, 4), rng.integers(1, 5, 3)
        full = search_exhaustive(d, p, 10**6)
        scored = {_key(s.config): (s.cost, s.params) for s in full.table}
        budgets = sorted({s.params for s in full.table})
        for budget in budgets[:: max(1, len(budgets) // 6)] + budgets[-1:]:
            exhaustive, beam = search_exhaustive(d, p, budget), search_beam(d, p, budget, seed=seed)
            assert beam.params <= budget and beam.cost >= exhaustive.cost - 1e-12
            assert all(s.config[0] == [0] * 4 and s.params <= budget for s in beam.table)
            for s in beam.table:
                assert (pytest.approx(s.cost), s.params) == scored[_key(s.config)]
            assert beam.config == min(beam.table, key=lambda s: (round(s.cost, 12), s.params)).config
        # unlimited budget: one branch per task at every branchable block, as exhaustive
        assert search_beam(d, p, budgets[-1], seed=seed).config == full.config


def test_beam_builds_from_the_output_towards_the_input():
    # At the deepest block a-b is the closest pair, so the beam only proposes ab|c there; a tree
    # ac|b ; ac|b is cheaper overall (a-c is very close at the first block), which only the exhaustive search finds.
    d = _dis((0.9, 0.1, 0.95), (0.3, 0.35, 1.0))
    exhaustive = search_exhaustive(d, [1, 1], budget=4, first_shared=0)
    beam = search_beam(d, [1, 1], budget=4, first_shared=0)
    assert exhaustive.config == [[0, 1, 0], [0, 1, 0]] and exhaustive.cost == pytest.approx(0.225)
    assert beam.config == [[0, 0, 1], [0, 0, 1]] and beam.cost == pytest.approx(0.6)
    assert all(s.config[1] in ([0, 0, 0], [0, 0, 1], [0, 1, 2]) for s in beam.table)


def test_beam_width_and_first_shared():
    rng = np.random.default_rng(3)
    d, p = _random_dis(rng, 4, 5), [1, 1, 1, 1]
    narrow = search_beam(d, p, budget=12, beam_width=1)
    wide = search_beam(d, p, budget=12, beam_width=10)
    assert len(narrow.table) <= len(wide.table) and wide.cost <= narrow.cost + 1e-12
    shared = search_beam(d, p, budget=100, first_shared=2)
    assert shared.config[:2] == [[0] * 5] * 2 and all(s.config[1] == [0] * 5 for s in shared.table)
    assert search_beam(d, p, 12, seed=0).config == search_beam(d, p, 12, seed=0).config


def test_search_errors():
    d = np.zeros((2, 3, 3))
    for search in (search_exhaustive, search_beam):
        with pytest.raises(ValueError, match=r"smallest tree \(every block shared\) has 13"):
            search(d, [1, 2], budget=12, fixed_params=10)
        with pytest.raises(ValueError, match="block_params"):
            search(d, [1, 2, 3], budget=100)
        with pytest.raises(ValueError, match="dissimilarity"):
            search(np.zeros((2, 3, 4)), [1, 2], budget=100)
        with pytest.raises(ValueError, match="first_shared"):
            search(d, [1, 2], budget=100, first_shared=3)
    with pytest.raises(ValueError, match="beam_width"):
        search_beam(d, [1, 2], budget=100, beam_width=0)


# ------------------------------------------------------------------------------------------------ tree.json
def test_tree_json_round_trip(tmp_path):
    path = tmp_path / "out" / "tree.json"
    record = save_tree_json(path, BMTAS_EXAMPLE, ["s", "d", "n", "e"], cost=np.float64(1.25), params=np.int64(42), budget=50)
    assert sorted(p.name for p in path.parent.iterdir()) == ["tree.json"]  # no temporary file left behind
    on_disk = json.loads(path.read_text())
    assert on_disk == record and on_disk["cost"] == 1.25 and on_disk["params"] == 42
    assert on_disk["block_names"] == [f"block_{l}" for l in range(6)] and "[0, 0, 1, 2]" in path.read_text()  # a row per line
    loaded = load_tree_json(path)
    assert loaded["config"] == canonical_tree(BMTAS_EXAMPLE) and loaded["task_names"] == ["s", "d", "n", "e"]
    assert loaded["budget"] == 50
    save_tree_json(path, [[0, 0], [0, 1]], ("a", "b"), block_names=["layer3", "layer4"])
    assert load_tree_json(path)["block_names"] == ["layer3", "layer4"]


def test_bmtas_branch_config_loads(tmp_path):
    path = tmp_path / "branch_config.json"
    path.write_text(json.dumps({"config": BMTAS_EXAMPLE}))
    loaded = load_tree_json(path)
    assert loaded["config"] == canonical_tree(BMTAS_EXAMPLE)
    assert loaded["task_names"] is None and loaded["block_names"] is None
    assert tree_mappings(loaded["config"]) == tree_mappings(BMTAS_EXAMPLE)


@pytest.mark.parametrize(
    "text, problem",
    [
        ("{not json", "not valid JSON"),
        ("[[0, 0]]", "not a tree file"),
        ('{"task_names": ["a"]}', "not a tree file"),
        ('{"config": [[0, 0], [0]]}', "config"),
        ('{"config": [[0, 0]], "task_names": ["a"]}', "task_names must be 2 strings"),
        ('{"config": [[0, 0]], "block_names": ["x", "y"]}', "block_names must be 1 strings"),
    ],
)
def test_malformed_tree_files_name_the_file_and_the_problem(tmp_path, text, problem):
    path = tmp_path / "tree.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=problem) as err:
        load_tree_json(path)
    assert str(path) in str(err.value)


def test_save_refuses_names_that_do_not_fit(tmp_path):
    with pytest.raises(ValueError, match="task_names must be 3 strings"):
        save_tree_json(tmp_path / "tree.json", [[0, 0, 1]], ["a", "b"])
    with pytest.raises(ValueError, match="task_names must be 2 strings"):
        save_tree_json(tmp_path / "tree.json", [[0, 0]], "ab")
    with pytest.raises(ValueError, match="block_names must be 1 strings"):
        save_tree_json(tmp_path / "tree.json", [[0, 0]], ["a", "b"], block_names=["x", "y"])
    assert not (tmp_path / "tree.json").exists()
