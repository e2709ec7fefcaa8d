"""The random baselines of two findings keep what their papers hold fixed: AdaShare's Random #1 keeps the
learned policy's number of skipped blocks in total and Random #2 each task's (section 4.1); a random tree for
Branched MTN keeps the searched tree's branch count at every block, so it stays within the searched tree's
parameter budget, and it is a tree (each block's partition refines the one before)."""


import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtl_med.sharing.branched import canonical_tree
from mtl_med.sharing.branched.trees import tree_num_branches, tree_params


@pytest.fixture(scope="module")
def adashare(load_benchmark):
    return load_benchmark("adashare_digits")


@pytest.fixture(scope="module")
def branched(load_benchmark):
    return load_benchmark("branched_digits")


POLICIES = st.tuples(st.integers(2, 6), st.integers(2, 10)).flatmap(
    lambda s: st.lists(st.booleans(), min_size=s[0] * s[1], max_size=s[0] * s[1]).map(
        lambda v: np.array(v, dtype=bool).reshape(s)))


@settings(max_examples=80, deadline=None)
@given(policy=POLICIES, seed=st.integers(0, 2**32 - 1))
def test_random_policies_keep_the_skipped_block_counts(policy, seed, adashare):
    rng = np.random.default_rng(seed)
    one = adashare.random_policy(policy, False, rng)
    two = adashare.random_policy(policy, True, rng)
    assert one.shape == two.shape == policy.shape
    assert (~one).sum() == (~policy).sum()  # Random #1: the total
    assert ((~two).sum(1) == (~policy).sum(1)).all()  # Random #2: every task's


TREES = st.tuples(st.integers(2, 5), st.integers(2, 6)).flatmap(
    lambda s: st.lists(st.lists(st.integers(0, s[0] - 1), min_size=s[0], max_size=s[0]), min_size=s[1], max_size=s[1])
).map(canonical_tree)


@settings(max_examples=80, deadline=None)
@given(tree=TREES, seed=st.integers(0, 2**32 - 1), widths=st.lists(st.integers(1, 1000), min_size=6, max_size=6))
def test_random_trees_keep_the_branch_counts_and_the_budget(tree, seed, widths, branched):
    rnd = branched.random_tree(tree, np.random.default_rng(seed))
    assert list(tree_num_branches(rnd)) == list(tree_num_branches(tree))
    block_params = widths[: len(tree)]
    assert tree_params(rnd, block_params) <= tree_params(tree, block_params)
    for above, below in zip(rnd, rnd[1:]):  # refinement: tasks split once stay apart
        for i in range(len(above)):
            for j in range(len(above)):
                if above[i] != above[j]:
                    assert below[i] != below[j]
