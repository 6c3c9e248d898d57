"""Pipeline schedule tables and stage plans, checked without devices: every task once and in dependency order,
every stash read sees the value the executor expects, memory and bubble as the schedules promise."""

import itertools

import numpy as np
import pytest

from jaxdeep.config import load_config
from jaxdeep.parallel import schedules as sch
from jaxdeep.parallel.stages import StagePlan, balance_layers, plan_stages

FAMILIES = {"gpipe": 1, "1f1b": 1, "circular": 2, "interleaved": 2}
CASES = [
    (name, p, v, m)
    for (name, v), p in itertools.product(FAMILIES.items(), (2, 3, 4))
    for m in sorted({1, p - 1, p, p + 1, 2 * p, 4 * p} - {0})
]


def _id(case):
    return "{}-p{}-v{}-m{}".format(*case)


def check_order(s: sch.Schedule) -> None:
    """Each F and B task exactly once, on its stage's device, after what it depends on."""
    f_tick, b_tick = sch.task_ticks(s)
    n, m, p = s.n_stages, s.n_microbatches, s.n_devices
    assert set(f_tick) == {(i, k) for i in range(m) for k in range(n - 1 if s.train else n)}
    assert set(b_tick) == ({(i, k) for i in range(m) for k in range(n)} if s.train else set())
    for table in (s.forward, s.backward):
        t, d = np.nonzero(table[:, :, 0] != sch.IDLE)
        assert np.all(table[t, d, 1] % p == d), "a task ran on a device that does not hold its stage"
    for (i, k), t in f_tick.items():
        assert k == 0 or f_tick[(i, k - 1)] < t
    for (i, k), t in b_tick.items():
        assert (f_tick[(i, k - 1)] if k == n - 1 else b_tick[(i, k + 1)]) < t
    if s.name in ("gpipe", "circular") and s.train:
        assert max(f_tick.values()) < min(b_tick.values()), "gpipe order runs every forward first"


def simulate_stash(s: sch.Schedule, plan: sch.BufferPlan) -> None:
    """Run the executor's data movement on labels instead of arrays; every read must find the right label."""
    p, n = s.n_devices, s.n_stages
    stash = [[None] * (plan.n_input_slots + 1) for _ in range(p)]
    grads = [[None] * (plan.n_grad_slots + 1) for _ in range(p)]
    c = {name: plan.column(name) for name in sch.COLUMNS}
    for t in range(plan.table.shape[0]):
        sent_f, sent_b = [None] * p, [None] * p
        for d in range(p):
            if c["f_kind"][t, d]:
                i, k = int(c["f_mb"][t, d]), int(c["f_chunk"][t, d]) * p + d
                if k > 0:
                    assert stash[d][c["f_slot"][t, d]] == ("act", i, k), (t, d, i, k)
                sent_f[(d + 1) % p] = ("act", i, k + 1)
            if c["b_kind"][t, d]:
                i, k = int(c["b_mb"][t, d]), int(c["b_chunk"][t, d]) * p + d
                if k > 0:
                    assert stash[d][c["b_slot"][t, d]] == ("act", i, k), (t, d, i, k)
                    sent_b[(d - 1) % p] = ("grad", i, k - 1)
                if k < n - 1:
                    assert grads[d][c["b_grad_slot"][t, d]] == ("grad", i, k), (t, d, i, k)
        for d in range(p):
            stash[d][c["recv_f_slot"][t, d]] = sent_f[d]
            grads[d][c["recv_b_slot"][t, d]] = sent_b[d]


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_schedule_runs_every_task_once_in_order_and_the_stash_holds_what_is_read(case):
    for train in (True, False):
        s = sch.build_schedule(*case, train=train)
        check_order(s)
        simulate_stash(s, sch.plan_buffers(s))


def test_padded_tables_still_deliver_every_value():
    plans = [sch.build_schedule(name, 4, 1, 8) for name in ("gpipe", "1f1b")]
    padded = sch.pad_buffers([sch.plan_buffers(s) for s in plans])
    assert padded[0].table.shape == padded[1].table.shape
    assert padded[0].n_input_slots == padded[1].n_input_slots == 8
    for s, plan in zip(plans, padded, strict=True):
        simulate_stash(s, plan)


def test_simulation_catches_a_wrong_slot():
    s = sch.build_schedule("1f1b", 4, 1, 8)
    plan = sch.plan_buffers(s)
    table = plan.table.copy()
    t, d = np.argwhere(plan.column("b_kind") == sch.KIND_MIDDLE)[0]
    table[t, d, sch.COLUMNS.index("b_slot")] = plan.n_input_slots  # read the scratch slot instead
    with pytest.raises(AssertionError):
        simulate_stash(s, sch.BufferPlan(table, plan.n_input_slots, plan.n_grad_slots))


@pytest.mark.parametrize("p", [2, 3, 4, 8])
def test_1f1b_memory_is_bounded_and_gpipe_memory_grows_with_the_microbatches(p):
    for m in (p, 4 * p, 16 * p):
        one_f_one_b = sch.plan_buffers(sch.build_schedule("1f1b", p, 1, m))
        gpipe = sch.plan_buffers(sch.build_schedule("gpipe", p, 1, m))
        # Lock step: device d holds 2(p - 1 - d) + 1 inputs; the first needs none (it re-embeds its tokens).
        assert one_f_one_b.n_input_slots == max(1, min(m, 2 * p - 3)), (p, m)
        assert gpipe.n_input_slots == m
        assert one_f_one_b.n_grad_slots == gpipe.n_grad_slots == 1


@pytest.mark.parametrize("name, v", FAMILIES.items())
@pytest.mark.parametrize("p", [2, 4, 8])
def test_bubble_meets_the_equal_stage_theory(name, v, p):
    for m in (p, 2 * p, 4 * p):
        s = sch.build_schedule(name, p, v, m)
        theory = sch.theoretical_bubble(p, m, v)
        bubble = sch.simulated_bubble(s)
        # At or below the textbook figure (below: the last stage runs its forward inside its backward).
        assert 0 < bubble <= theory + 1e-9, (name, p, m, bubble, theory)
        if name == "interleaved":
            assert bubble < sch.simulated_bubble(sch.build_schedule("1f1b", p, 1, m))


def test_unknown_schedule_and_bad_sizes():
    with pytest.raises(ValueError, match="unknown pipeline schedule 'zb'"):
        sch.build_schedule("zb", 2, 1, 2)
    with pytest.raises(ValueError, match=">= 2 devices"):
        sch.build_schedule("1f1b", 1, 1, 2)


# ----------------------------------------------------------------------------- stage plans


def test_balance_layers():
    assert balance_layers([1.0] * 8, 4) == (2, 2, 2, 2)
    assert balance_layers([1.0] * 8, 3) == (3, 3, 2)
    # The head costs as much as two layers: the last stage gives up layers.
    assert balance_layers([1.0] * 8, 2, last_extra=2.0) == (5, 3)
    assert balance_layers([1.0] * 6, 4, last_extra=1.0) == (2, 2, 1, 1)
    assert balance_layers([4.0, 1.0, 1.0, 1.0, 1.0], 2) == (1, 4)
    with pytest.raises(ValueError, match="cannot split 3 layers into 4"):
        balance_layers([1.0] * 3, 4)


def test_stage_plan_layout():
    plan = StagePlan(2, 2, (1, 2, 2, 1))  # stages 0 and 2 on device 0, 1 and 3 on device 1
    index, valid = plan.index()
    assert plan.slots == 2 and not plan.is_contiguous
    assert index[0, 0, :1].tolist() == [0] and index[1, 0].tolist() == [1, 2]
    assert index[0, 1].tolist() == [3, 4] and index[1, 1, :1].tolist() == [5]
    assert valid.sum() == 6 and valid[0, 0].tolist() == [True, False]
    assert StagePlan(4, 1, (2, 2, 2, 2)).is_contiguous


def test_plan_stages_balances_by_cost_unless_given():
    cfg = load_config(None, ["model.n_layers=8", "model.vocab_size=3584", "model.d_model=64", "model.d_ff=128"])
    assert plan_stages(cfg.model, 64, 2, 1).layers == (5, 3)  # the head costs two layers here
    assert plan_stages(cfg.model, 64, 2, 1, (4, 4)).layers == (4, 4)
